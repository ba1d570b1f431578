//! One file's transfer into the blob store, resumable and verified.
//!
//! Data goes to `blobs/<etag>.lmxpart`; a JSON sidecar (`.lmxpart.json`, written atomically)
//! records which byte ranges are on disk, so a transfer interrupted by a network drop, a cancel or
//! `kill -9` continues with HTTP Range requests where it stopped, also after a restart. Large
//! files are fetched as parallel ranged parts. Every transient error (connection reset, body cut
//! short, 429/5xx, no bytes for the stall timeout) retries with backoff from the current offset.
//! The content hash (sha256 for LFS files, git blob sha1 otherwise) is computed while a single
//! stream arrives (after re-hashing the resumed prefix), or read back for multi-part transfers,
//! and compared with the hub's before the blob is renamed into place: a blob appears under
//! `blobs/` only complete and verified. A mismatch deletes the data. A blob already in place is
//! hashed too before it counts as cached: one whose content does not match its name is replaced.

use std::{
    io::SeekFrom,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{
    hub::{HubClient, HubError, RemoteFile},
    progress::{DownloadErrorCode as Code, DownloadFailure, FileCounters, FileState},
};
use crate::snapshot::{
    partial::{PartialMeta, LMX_PARTIAL_META_SUFFIX, LMX_PARTIAL_SUFFIX},
    BlobHasher,
};

/// Transfer settings.
#[derive(Debug, Clone)]
pub struct TransferSettings {
    /// Files of at least twice this size are fetched in parts of this size.
    pub part_size: u64,
    /// Parts of one file fetched at once.
    pub parts_in_parallel: usize,
    /// A transfer with no bytes for this long is restarted.
    pub stall_timeout: Duration,
}

/// A byte range of the file and how much of it is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub start: u64,
    pub end: u64,
    pub done: u64,
}

impl Part {
    fn complete(&self) -> bool {
        self.start + self.done >= self.end
    }
}

/// The sidecar: what the partial file is and which parts are on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sidecar {
    #[serde(flatten)]
    meta: PartialMeta,
    parts: Vec<Part>,
}

/// How often the sidecar catches up with the bytes on disk while a part transfers.
const PERSIST_INTERVAL: Duration = Duration::from_millis(250);

/// Everything a transfer needs.
pub struct Transfer<'a> {
    pub hub: &'a HubClient,
    pub repo_id: &'a str,
    pub commit: &'a str,
    pub blobs: &'a Path,
    pub file: &'a RemoteFile,
    pub counters: Arc<FileCounters>,
    pub settings: &'a TransferSettings,
    pub cancel: &'a CancellationToken,
}

fn io_failure(what: &str, err: &std::io::Error) -> DownloadFailure {
    let full = err.raw_os_error() == Some(28) || err.kind() == std::io::ErrorKind::StorageFull;
    let code = if full {
        Code::InsufficientDiskSpace
    } else {
        Code::StorageError
    };
    DownloadFailure::new(code, format!("{what}: {err}"))
}

fn plan_parts(size: u64, settings: &TransferSettings) -> Vec<Part> {
    if size < settings.part_size.saturating_mul(2) || settings.parts_in_parallel < 2 {
        return vec![Part {
            start: 0,
            end: size,
            done: 0,
        }];
    }
    let mut parts = Vec::new();
    let mut start = 0;
    while start < size {
        let end = (start + settings.part_size).min(size);
        parts.push(Part {
            start,
            end,
            done: 0,
        });
        start = end;
    }
    parts
}

impl Transfer<'_> {
    fn blob(&self) -> PathBuf {
        self.blobs.join(&self.file.etag)
    }

    fn partial(&self) -> PathBuf {
        self.blobs
            .join(format!("{}{LMX_PARTIAL_SUFFIX}", self.file.etag))
    }

    fn sidecar_path(&self) -> PathBuf {
        self.blobs
            .join(format!("{}{LMX_PARTIAL_META_SUFFIX}", self.file.etag))
    }

    /// Reads a sidecar that matches this file, if any (a partial without one starts over).
    fn load_sidecar(&self) -> Option<Vec<Part>> {
        let partial_len = std::fs::metadata(self.partial()).ok()?.len();
        let sidecar: Sidecar =
            serde_json::from_slice(&std::fs::read(self.sidecar_path()).ok()?).ok()?;
        let valid = sidecar.meta.size == self.file.size
            && partial_len == self.file.size
            && sidecar
                .parts
                .iter()
                .all(|p| p.start <= p.end && p.done <= p.end - p.start && p.end <= self.file.size);
        valid.then_some(sidecar.parts)
    }

    fn persist(&self, parts: &[Part]) -> Result<(), DownloadFailure> {
        let sidecar = Sidecar {
            meta: PartialMeta {
                repo: self.repo_id.to_owned(),
                commit: self.commit.to_owned(),
                path: self.file.path.clone(),
                size: self.file.size,
                sha256: self.file.lfs.then(|| self.file.etag.clone()),
            },
            parts: parts.to_vec(),
        };
        let path = self.sidecar_path();
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(&sidecar)
            .map_err(|e| DownloadFailure::new(Code::Internal, e.to_string()))?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| io_failure("writing the partial download's sidecar", &e))
    }

    fn remove_partial(&self) {
        let _ = std::fs::remove_file(self.partial());
        let _ = std::fs::remove_file(self.sidecar_path());
    }

    /// Brings the file into the blob store; returns the blob's path.
    pub async fn run(&self) -> Result<PathBuf, DownloadFailure> {
        let blob = self.blob();
        if std::fs::metadata(&blob).is_ok_and(|m| m.len() == self.file.size) {
            // A blob is named by its content hash: trusted only when its content has that hash,
            // never on its size alone. One that does not is replaced.
            self.counters.set_state(FileState::Verifying);
            let (path, lfs, size) = (blob.clone(), self.file.lfs, self.file.size);
            let digest = tokio::task::spawn_blocking(move || hash_file(&path, lfs, size))
                .await
                .map_err(|e| DownloadFailure::new(Code::Internal, e.to_string()))?
                .map_err(|e| io_failure("hashing the cached blob", &e))?;
            if digest == self.file.etag {
                self.counters
                    .downloaded
                    .store(self.file.size, Ordering::Relaxed);
                self.counters.set_state(FileState::Cached);
                return Ok(blob);
            }
            tracing::warn!(file = %self.file.path, blob = %blob.display(), %digest, "a cached blob's content does not match its name; fetching it again");
            std::fs::remove_file(&blob)
                .map_err(|e| io_failure("removing the corrupt cached blob", &e))?;
        }
        std::fs::create_dir_all(self.blobs)
            .map_err(|e| io_failure("creating the blob store", &e))?;
        let parts = match self.load_sidecar() {
            Some(parts) => parts,
            None => {
                let file = std::fs::File::create(self.partial())
                    .map_err(|e| io_failure("creating the partial file", &e))?;
                file.set_len(self.file.size)
                    .map_err(|e| io_failure("sizing the partial file", &e))?;
                let parts = plan_parts(self.file.size, self.settings);
                self.persist(&parts)?;
                parts
            }
        };
        let resumed: u64 = parts.iter().map(|p| p.done).sum();
        self.counters.resumed.store(resumed, Ordering::Relaxed);
        self.counters.downloaded.store(resumed, Ordering::Relaxed);
        if resumed > 0 {
            tracing::info!(file = %self.file.path, resumed, "resuming a partial download");
        }
        self.counters.set_state(FileState::Downloading);

        let single = parts.len() == 1;
        let digest = if single {
            Some(self.fetch_single(parts[0]).await?)
        } else {
            self.fetch_parts(parts).await?;
            None
        };

        self.counters.set_state(FileState::Verifying);
        let digest = match digest {
            Some(d) => d,
            None => {
                let (path, lfs, size) = (self.partial(), self.file.lfs, self.file.size);
                tokio::task::spawn_blocking(move || hash_file(&path, lfs, size))
                    .await
                    .map_err(|e| DownloadFailure::new(Code::Internal, e.to_string()))?
                    .map_err(|e| io_failure("hashing the downloaded file", &e))?
            }
        };
        if digest != self.file.etag {
            self.remove_partial();
            self.counters.downloaded.store(0, Ordering::Relaxed);
            self.counters.resumed.store(0, Ordering::Relaxed);
            self.counters.set_state(FileState::Failed);
            let algorithm = if self.file.lfs {
                "sha256"
            } else {
                "git blob sha1"
            };
            return Err(DownloadFailure::new(
                Code::ChecksumMismatch,
                format!(
                    "{}: the content's {algorithm} is {digest} but the hub says {}; the bad data was deleted",
                    self.file.path, self.file.etag
                ),
            ));
        }
        let partial = self.partial();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&partial)
            .map_err(|e| io_failure("opening the downloaded file", &e))?;
        file.sync_all()
            .map_err(|e| io_failure("flushing the downloaded file", &e))?;
        std::fs::rename(&partial, &blob)
            .map_err(|e| io_failure("moving the blob into place", &e))?;
        let _ = std::fs::remove_file(self.sidecar_path());
        self.counters.set_state(FileState::Completed);
        Ok(blob)
    }

    /// One stream from the first missing byte to the end, hashed as it arrives.
    async fn fetch_single(&self, part: Part) -> Result<String, DownloadFailure> {
        let mut hasher = BlobHasher::new(self.file.lfs, self.file.size);
        if part.done > 0 {
            let (path, done) = (self.partial(), part.done);
            hasher = tokio::task::spawn_blocking(move || {
                use std::io::Read;
                hasher
                    .feed(std::fs::File::open(path)?.take(done))
                    .map(|_| hasher)
            })
            .await
            .map_err(|e| DownloadFailure::new(Code::Internal, e.to_string()))?
            .map_err(|e| io_failure("re-hashing the resumed bytes", &e))?;
        }
        let parts = Mutex::new(vec![part]);
        self.fetch_part(&parts, 0, Some(&mut hasher)).await?;
        Ok(hasher.finish())
    }

    /// Parts in parallel (bounded), each resumable on its own.
    async fn fetch_parts(&self, parts: Vec<Part>) -> Result<(), DownloadFailure> {
        let todo: Vec<usize> = parts
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.complete())
            .map(|(i, _)| i)
            .collect();
        let parts = Mutex::new(parts);
        let results: Vec<Result<(), DownloadFailure>> = futures::stream::iter(todo)
            .map(|i| {
                let parts = &parts;
                async move { self.fetch_part(parts, i, None).await }
            })
            .buffer_unordered(self.settings.parts_in_parallel.max(1))
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    /// Fetches part `index` to its end, retrying transient errors from the current offset.
    async fn fetch_part(
        &self,
        parts: &Mutex<Vec<Part>>,
        index: usize,
        mut hasher: Option<&mut BlobHasher>,
    ) -> Result<(), DownloadFailure> {
        let url = self
            .hub
            .file_url(self.repo_id, self.commit, &self.file.path);
        let what = format!("downloading {}", self.file.path);
        let mut backoff = backon::BackoffBuilder::build(self.hub.retry().backoff());
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(self.partial())
            .await
            .map_err(|e| io_failure("opening the partial file", &e))?;
        loop {
            let part = parts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[index];
            if part.complete() {
                return Ok(());
            }
            let result = self
                .stream_part(&url, &what, &mut file, parts, index, hasher.as_deref_mut())
                .await;
            let error = match result {
                Ok(()) => continue,
                Err(StreamError::Fatal(f)) => {
                    let snapshot = parts
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone();
                    let _ = self.persist(&snapshot);
                    return Err(f);
                }
                Err(StreamError::Transient(e)) => e,
            };
            let snapshot = parts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            self.persist(&snapshot)?;
            match Iterator::next(&mut backoff) {
                Some(delay) => {
                    tracing::warn!(file = %self.file.path, error = %error.message, ?delay, "transfer interrupted; resuming");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.cancel.cancelled() => return Err(DownloadFailure::cancelled()),
                    }
                }
                None => {
                    let code = if error.short_body {
                        Code::IncompleteDownload
                    } else {
                        Code::HubUnavailable
                    };
                    return Err(DownloadFailure::new(
                        code,
                        format!("{what}: gave up after retries: {}", error.message),
                    ));
                }
            }
        }
    }

    /// One request for the rest of a part. Ok when the part is complete.
    async fn stream_part(
        &self,
        url: &str,
        what: &str,
        file: &mut tokio::fs::File,
        parts: &Mutex<Vec<Part>>,
        index: usize,
        mut hasher: Option<&mut BlobHasher>,
    ) -> Result<(), StreamError> {
        let part = parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[index];
        let offset = part.start + part.done;
        let response = tokio::select! {
            r = self.hub.get_range(url, offset, part.end, what) => r,
            () = self.cancel.cancelled() => return Err(StreamError::Fatal(DownloadFailure::cancelled())),
        };
        let response = match response {
            Ok(r) => r,
            Err(HubError::Fatal(f)) => return Err(StreamError::Fatal(f)),
            Err(HubError::Transient(message)) => return Err(StreamError::transient(message)),
        };
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(|e| StreamError::Fatal(io_failure("seeking in the partial file", &e)))?;
        let mut body = response.bytes_stream();
        // The sidecar follows the bytes on disk at least every PERSIST_INTERVAL, also while the
        // body waits (so a `kill -9` during a stall loses little).
        let mut persist = tokio::time::interval(PERSIST_INTERVAL);
        persist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_persist = tokio::time::Instant::now();
        let mut dirty = false;
        let stall = tokio::time::sleep(self.settings.stall_timeout);
        tokio::pin!(stall);
        loop {
            if self.cancel.is_cancelled() {
                let _ = file.flush().await;
                return Err(StreamError::Fatal(DownloadFailure::cancelled()));
            }
            if dirty && last_persist.elapsed() >= PERSIST_INTERVAL {
                dirty = false;
                last_persist = tokio::time::Instant::now();
                file.flush()
                    .await
                    .map_err(|e| StreamError::Fatal(io_failure("writing the partial file", &e)))?;
                let snapshot = parts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                self.persist(&snapshot).map_err(StreamError::Fatal)?;
            }
            let next = tokio::select! {
                // Data first: what already arrived is written before anything else is decided.
                biased;
                next = body.next() => next,
                () = self.cancel.cancelled() => continue,
                () = &mut stall => {
                    return Err(StreamError::transient(format!(
                        "{what}: no data for {:?} (stalled)",
                        self.settings.stall_timeout
                    )))
                }
                _ = persist.tick() => continue,
            };
            stall
                .as_mut()
                .reset(tokio::time::Instant::now() + self.settings.stall_timeout);
            let chunk = match next {
                None => break,
                Some(Err(e)) => {
                    return Err(StreamError::Transient(Interrupted {
                        message: format!("{what}: {}", crate::util::error_chain(&e)),
                        short_body: ended_early(&e),
                    }))
                }
                Some(Ok(chunk)) => chunk,
            };
            let room = {
                let p = parts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)[index];
                p.end - (p.start + p.done)
            };
            let chunk = &chunk[..chunk.len().min(room as usize)];
            file.write_all(chunk)
                .await
                .map_err(|e| StreamError::Fatal(io_failure("writing the partial file", &e)))?;
            if let Some(h) = hasher.as_deref_mut() {
                h.update(chunk);
            }
            let n = chunk.len() as u64;
            parts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[index]
                .done += n;
            self.counters.downloaded.fetch_add(n, Ordering::Relaxed);
            metrics::counter!("lmx_download_bytes_total").increment(n);
            dirty = true;
            if room == n {
                break;
            }
        }
        file.flush()
            .await
            .map_err(|e| StreamError::Fatal(io_failure("writing the partial file", &e)))?;
        let part = parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[index];
        if part.complete() {
            let snapshot = parts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            self.persist(&snapshot).map_err(StreamError::Fatal)?;
            Ok(())
        } else {
            Err(StreamError::Transient(Interrupted {
                message: format!(
                    "{what}: the body ended after byte {} of {}",
                    part.start + part.done,
                    part.end
                ),
                short_body: true,
            }))
        }
    }
}

/// Whether a body error means the server closed the body before its Content-Length.
fn ended_early(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(e) = source {
        let incomplete = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message);
        let eof = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof);
        if incomplete || eof {
            return true;
        }
        source = e.source();
    }
    false
}

struct Interrupted {
    message: String,
    /// The server ended the body early (rather than failing or stalling).
    short_body: bool,
}

enum StreamError {
    Fatal(DownloadFailure),
    Transient(Interrupted),
}

impl StreamError {
    fn transient(message: String) -> Self {
        Self::Transient(Interrupted {
            message,
            short_body: false,
        })
    }
}

fn hash_file(path: &Path, lfs: bool, size: u64) -> std::io::Result<String> {
    let mut hasher = BlobHasher::new(lfs, size);
    hasher.feed(std::fs::File::open(path)?)?;
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_files_split_into_parts() {
        let settings = TransferSettings {
            part_size: 10,
            parts_in_parallel: 4,
            stall_timeout: Duration::from_secs(1),
        };
        assert_eq!(plan_parts(19, &settings).len(), 1);
        let parts = plan_parts(25, &settings);
        assert_eq!(
            parts.iter().map(|p| (p.start, p.end)).collect::<Vec<_>>(),
            [(0, 10), (10, 20), (20, 25)]
        );
        let serial = TransferSettings {
            parts_in_parallel: 1,
            ..settings
        };
        assert_eq!(plan_parts(100, &serial).len(), 1);
    }

    #[test]
    fn incremental_hashes_are_the_hub_etags() {
        let data = b"hello\n";
        let mut h = BlobHasher::new(false, data.len() as u64);
        h.update(&data[..2]);
        h.update(&data[2..]);
        assert_eq!(h.finish(), "ce013625030ba8dba906f756967f9e9ca394464a");
        let mut h = BlobHasher::new(true, 3);
        h.update(b"abc");
        assert_eq!(
            h.finish(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
