//! The models on disk: every snapshot in the cache (pulled by lmx or by Python's
//! huggingface_hub) with its refs, size and completeness, and deletion of snapshots together with
//! the blobs no remaining snapshot references. Blocking file I/O: call off the async runtime.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    path::{Path, PathBuf},
};

use super::{
    cache::{is_commit_sha, Cache, CacheError},
    ManagerError,
};
use crate::snapshot::{self, Report};

/// A snapshot folder in the cache.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub repo_id: String,
    pub commit: String,
    /// Refs (branches, tags) pointing at this commit.
    pub refs: Vec<String>,
    pub path: PathBuf,
    /// Bytes of the files the snapshot links to.
    pub size_on_disk: u64,
    /// The QUICK check, or why it could not run.
    pub report: Result<Report, String>,
    /// Its GGUF files with their quantization, sorted by path.
    pub gguf_files: Vec<snapshot::GgufFile>,
}

/// "models--org--name" → "org/name".
fn repo_id_of(folder: &str) -> Option<String> {
    let rest = folder.strip_prefix("models--")?;
    Some(rest.replacen("--", "/", 1))
}

/// Files (resolved) a snapshot folder links to.
fn snapshot_files(snapshot: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(snapshot)
        .follow_links(false)
        .max_depth(32)
        .into_iter()
        .flatten()
        .filter(|e| !e.file_type().is_dir())
        .filter_map(|e| fs::canonicalize(e.path()).ok())
        .collect()
}

fn size_of(files: &[PathBuf]) -> u64 {
    let unique: HashSet<&PathBuf> = files.iter().collect();
    unique
        .iter()
        .filter_map(|f| fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// Every snapshot in the cache, ordered by repo id then commit.
pub fn scan(cache: &Cache) -> Vec<SnapshotInfo> {
    let Ok(entries) = fs::read_dir(cache.root()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let folder = entry.file_name().to_string_lossy().into_owned();
        let Some(repo_id) = repo_id_of(&folder) else {
            continue;
        };
        let refs = cache.refs(&repo_id);
        let Ok(snapshots) = fs::read_dir(entry.path().join("snapshots")) else {
            continue;
        };
        for snap in snapshots.flatten() {
            let commit = snap.file_name().to_string_lossy().into_owned();
            if !snap.path().is_dir() {
                continue;
            }
            let path = snap.path();
            let files = snapshot_files(&path);
            out.push(SnapshotInfo {
                repo_id: repo_id.clone(),
                refs: refs
                    .iter()
                    .filter(|(_, c)| **c == commit)
                    .map(|(r, _)| r.clone())
                    .collect(),
                size_on_disk: size_of(&files),
                report: snapshot::verify(&path, snapshot::Mode::Quick).map_err(|e| e.to_string()),
                gguf_files: snapshot::gguf::gguf_files(&path),
                commit,
                path,
            });
        }
    }
    out.sort_by(|a, b| (&a.repo_id, &a.commit).cmp(&(&b.repo_id, &b.commit)));
    out
}

/// What a delete removed.
#[derive(Debug, Clone, Default)]
pub struct Deleted {
    pub commits: Vec<String>,
    pub freed_bytes: u64,
}

fn io(path: &Path, source: std::io::Error) -> ManagerError {
    ManagerError::Cache(CacheError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Deletes `repo_id`'s snapshot at `revision` (a ref or a commit), or every snapshot when
/// `revision` is empty, with the refs pointing at them and every blob no remaining snapshot
/// references.
pub fn delete(cache: &Cache, repo_id: &str, revision: &str) -> Result<Deleted, ManagerError> {
    let repo_dir = cache.repo_dir(repo_id);
    if !repo_dir.is_dir() {
        return Err(CacheError::ModelNotFound {
            model_id: repo_id.to_owned(),
            cache_dir: cache.root().to_owned(),
        }
        .into());
    }
    let refs: BTreeMap<String, String> = cache.refs(repo_id);
    let snapshots_dir = repo_dir.join("snapshots");
    let all: Vec<String> = fs::read_dir(&snapshots_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let doomed: Vec<String> = if revision.is_empty() {
        all.clone()
    } else if let Some(commit) = refs.get(revision) {
        vec![commit.clone()]
    } else if is_commit_sha(revision) && all.iter().any(|c| c == revision) {
        vec![revision.to_owned()]
    } else {
        return Err(CacheError::RevisionNotFound {
            model_id: repo_id.to_owned(),
            revision: revision.to_owned(),
            known: refs.into_keys().collect(),
        }
        .into());
    };

    // Blobs still needed by the snapshots that stay.
    let keep: HashSet<PathBuf> = all
        .iter()
        .filter(|c| !doomed.contains(c))
        .flat_map(|c| snapshot_files(&snapshots_dir.join(c)))
        .collect();
    let mut freed = 0;
    let mut candidates: HashSet<PathBuf> = HashSet::new();
    for commit in &doomed {
        let dir = snapshots_dir.join(commit);
        candidates.extend(snapshot_files(&dir));
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
        }
    }
    for blob in candidates.difference(&keep) {
        if blob.starts_with(repo_dir.join("blobs"))
            || blob.starts_with(fs::canonicalize(repo_dir.join("blobs")).unwrap_or_default())
        {
            freed += fs::metadata(blob).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(blob).map_err(|e| io(blob, e))?;
        }
    }
    for (name, commit) in &refs {
        if doomed.contains(commit) {
            let path = repo_dir.join("refs").join(name);
            fs::remove_file(&path).map_err(|e| io(&path, e))?;
        }
    }
    if revision.is_empty() {
        // Nothing of the repository is wanted: partial downloads and all go.
        fs::remove_dir_all(&repo_dir).map_err(|e| io(&repo_dir, e))?;
    }
    Ok(Deleted {
        commits: doomed,
        freed_bytes: freed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn scan_lists_snapshots_with_refs_sizes_and_completeness() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let files = testing::sharded_safetensors_repo(2, 8);
        testing::write_hf_cache(dir.path(), "org/m", A, Some("main"), &files);
        let mut broken = files.clone();
        broken.remove("model-00002-of-00002.safetensors");
        testing::write_hf_cache(dir.path(), "org/m", B, Some("dev"), &broken);
        let found = scan(&cache);
        assert_eq!(found.len(), 2);
        assert_eq!(
            (found[0].repo_id.as_str(), found[0].refs.as_slice()),
            ("org/m", &["main".to_owned()][..])
        );
        assert!(found[0].report.as_ref().unwrap().complete);
        assert_eq!(found[0].size_on_disk, files.size());
        assert!(!found[1].report.as_ref().unwrap().complete);
    }

    #[test]
    fn delete_keeps_blobs_other_snapshots_use() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let files = testing::sharded_safetensors_repo(2, 8);
        testing::write_hf_cache(dir.path(), "org/m", A, Some("main"), &files);
        let mut changed = files.clone();
        changed.insert("config.json", br#"{"model_type":"llama","v":2}"#.to_vec());
        testing::write_hf_cache(dir.path(), "org/m", B, Some("dev"), &changed);
        let deleted = delete(&cache, "org/m", "dev").unwrap();
        assert_eq!(deleted.commits, [B]);
        assert_eq!(
            deleted.freed_bytes,
            changed.get("config.json").unwrap().len() as u64,
            "only the blob B alone used"
        );
        let left = scan(&cache);
        assert_eq!(left.len(), 1);
        assert!(left[0].report.as_ref().unwrap().complete, "A is intact");
        assert!(!cache.repo_dir("org/m").join("refs/dev").exists());
        assert!(matches!(
            delete(&cache, "org/m", "dev"),
            Err(ManagerError::Cache(CacheError::RevisionNotFound { .. }))
        ));
        let all = delete(&cache, "org/m", "").unwrap();
        assert_eq!(all.commits, [A]);
        assert!(!cache.repo_dir("org/m").exists());
    }
}
