//! FULL mode: content hashes, offline.
//!
//! In the HF cache a blob's file name is the hub's etag: the sha256 of the content for LFS files
//! (64 hex digits) or the git blob sha1 (`sha1("blob <len>\0" + content)`, 40 hex digits) for
//! small files. In a plain folder downloaded by huggingface_hub (`local_dir`), the etag recorded
//! at download time sits in `.cache/huggingface/download/<path>.metadata` (second line).
//! Every file with a known expected hash is hashed, streaming, files in parallel (rayon).

use std::{
    fs::File,
    io::{self, Read},
    path::{Path, PathBuf},
};

use rayon::prelude::*;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::{
    report::{Problem, ProblemKind},
    tree::{Layout, Tree},
};

/// Read size while hashing.
const CHUNK: usize = 1 << 20;

/// The hash a file's content must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedHash {
    /// sha256 of the content (LFS files), lowercase hex.
    Sha256(String),
    /// git blob sha1 (small files), lowercase hex.
    GitSha1(String),
}

impl ExpectedHash {
    /// Interprets an etag / blob name: 64 hex digits are a sha256, 40 a git sha1.
    pub fn from_etag(etag: &str) -> Option<Self> {
        let etag = etag
            .trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_ascii_lowercase();
        if !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        match etag.len() {
            64 => Some(Self::Sha256(etag)),
            40 => Some(Self::GitSha1(etag)),
            _ => None,
        }
    }
}

/// An incremental hub content hash: sha256 (LFS files) or git blob sha1 (small files, whose
/// `blob <len>\0` header it feeds first).
pub enum BlobHasher {
    Sha256(Sha256),
    GitSha1(Sha1),
}

impl BlobHasher {
    /// The hasher for a file of `len` bytes, LFS or not.
    pub fn new(lfs: bool, len: u64) -> Self {
        if lfs {
            Self::Sha256(Sha256::new())
        } else {
            let mut h = Sha1::new();
            h.update(format!("blob {len}\0").as_bytes());
            Self::GitSha1(h)
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::GitSha1(h) => h.update(bytes),
        }
    }

    /// Feeds all of `reader` in reads of `CHUNK` bytes; the bytes read.
    pub fn feed(&mut self, mut reader: impl Read) -> io::Result<u64> {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            self.update(&buf[..n]);
            total += n as u64;
        }
    }

    /// The digest as lowercase hex.
    pub fn finish(self) -> String {
        match self {
            Self::Sha256(h) => format!("{:x}", h.finalize()),
            Self::GitSha1(h) => format!("{:x}", h.finalize()),
        }
    }
}

/// Streaming sha256 of a reader, as lowercase hex, and the bytes read.
pub fn sha256_hex(reader: impl Read) -> io::Result<(String, u64)> {
    hash_hex(BlobHasher::new(true, 0), reader)
}

/// git's blob sha1 of a file of `len` bytes, as lowercase hex, and the bytes read.
pub fn git_sha1_hex(reader: impl Read, len: u64) -> io::Result<(String, u64)> {
    hash_hex(BlobHasher::new(false, len), reader)
}

fn hash_hex(mut hasher: BlobHasher, reader: impl Read) -> io::Result<(String, u64)> {
    let total = hasher.feed(reader)?;
    Ok((hasher.finish(), total))
}

struct Job {
    file: String,
    path: PathBuf,
    size: u64,
    expected: ExpectedHash,
    source: &'static str,
}

fn local_dir_etag(root: &Path, rel: &str) -> Option<String> {
    let meta = root
        .join(".cache/huggingface/download")
        .join(format!("{rel}.metadata"));
    let text = std::fs::read_to_string(meta).ok()?;
    text.lines().nth(1).map(str::to_owned)
}

fn jobs(tree: &Tree) -> Vec<Job> {
    let mut jobs = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (rel, entry) in &tree.files {
        let (etag, source) = match &tree.layout {
            Layout::Cache { .. } => (entry.blob.clone(), "the blob name (the hub's etag)"),
            Layout::Plain => (
                local_dir_etag(&tree.root, rel),
                "the etag recorded at download time",
            ),
        };
        let Some(expected) = etag.as_deref().and_then(ExpectedHash::from_etag) else {
            continue;
        };
        // Several snapshot entries may share one blob: hash it once.
        if seen.insert(entry.path.clone()) {
            jobs.push(Job {
                file: rel.clone(),
                path: entry.path.clone(),
                size: entry.size,
                expected,
                source,
            });
        }
    }
    jobs
}

/// Hashes every file with a known expected hash; returns the problems and the bytes hashed.
pub(crate) fn check(tree: &Tree) -> (Vec<Problem>, u64) {
    let results: Vec<(Option<Problem>, u64)> = jobs(tree)
        .into_par_iter()
        .map(|job| {
            let file = match File::open(&job.path) {
                Ok(file) => file,
                Err(e) => {
                    let p = Problem::error(
                        ProblemKind::Unreadable,
                        &job.file,
                        format!("cannot read: {e}"),
                    );
                    return (Some(p), 0);
                }
            };
            let (algorithm, want, result) = match &job.expected {
                ExpectedHash::Sha256(want) => ("sha256", want, sha256_hex(file)),
                ExpectedHash::GitSha1(want) => {
                    ("git blob sha1", want, git_sha1_hex(file, job.size))
                }
            };
            match result {
                Ok((got, hashed)) if &got == want => (None, hashed),
                Ok((got, hashed)) => (
                    Some(Problem::error(
                        ProblemKind::ChecksumMismatch,
                        &job.file,
                        format!(
                            "content {algorithm} is {got}, but {} says {want}",
                            job.source
                        ),
                    )),
                    hashed,
                ),
                Err(e) => (
                    Some(Problem::error(
                        ProblemKind::Unreadable,
                        &job.file,
                        format!("cannot read: {e}"),
                    )),
                    0,
                ),
            }
        })
        .collect();
    let bytes = results.iter().map(|(_, b)| b).sum();
    (results.into_iter().filter_map(|(p, _)| p).collect(), bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_map_to_hash_kinds() {
        let sha = "a".repeat(64);
        assert_eq!(
            ExpectedHash::from_etag(&format!("\"{sha}\"")),
            Some(ExpectedHash::Sha256(sha.clone()))
        );
        assert_eq!(
            ExpectedHash::from_etag(&"B".repeat(40)),
            Some(ExpectedHash::GitSha1("b".repeat(40)))
        );
        assert_eq!(ExpectedHash::from_etag("W/\"abc\""), None);
        assert_eq!(ExpectedHash::from_etag(&"z".repeat(64)), None);
    }

    #[test]
    fn hashes_match_known_values() {
        // sha256("abc") and `git hash-object` of "hello\n".
        let (h, n) = sha256_hex(&b"abc"[..]).unwrap();
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(n, 3);
        let (h, _) = git_sha1_hex(&b"hello\n"[..], 6).unwrap();
        assert_eq!(h, "ce013625030ba8dba906f756967f9e9ca394464a");
    }
}
