//! The hub client: repository listings and file metadata through hf-hub (its request builders,
//! auth headers and relative-redirect policy), ranged GETs through hf-hub's reqwest client, and
//! the classification of every failure into a [`DownloadErrorCode`] or a transient error worth a
//! retry (with backon's exponential backoff).

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use hf_hub::{
    api::tokio::{Api, ApiBuilder, ApiError},
    Repo, RepoType,
};
use reqwest::{header, StatusCode};
use serde::Deserialize;

use super::progress::{DownloadErrorCode as Code, DownloadFailure};
use crate::secret::Secret;

/// A failure of one hub request.
#[derive(Debug, Clone)]
pub enum HubError {
    /// Retrying cannot help (not found, access denied, ...).
    Fatal(DownloadFailure),
    /// Connection errors, timeouts, 429 and 5xx: worth a retry.
    Transient(String),
}

impl HubError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }

    /// The failure after retries ran out.
    pub fn into_failure(self, what: &str) -> DownloadFailure {
        match self {
            Self::Fatal(f) => f,
            Self::Transient(message) => DownloadFailure::new(
                Code::HubUnavailable,
                format!("{what}: the hub kept failing: {message}"),
            ),
        }
    }
}

/// What a 4xx/5xx means, from its status and the hub's X-Error-Code header. `not_found` is the
/// code a bare 404 gets in this context.
pub fn classify(
    status: StatusCode,
    error_code: Option<&str>,
    not_found: Code,
    what: &str,
) -> HubError {
    let fatal = |code: Code, why: &str| {
        HubError::Fatal(DownloadFailure::new(
            code,
            format!("{what}: {why} (HTTP {status})"),
        ))
    };
    match error_code {
        Some("RepoNotFound") => return fatal(Code::RepoNotFound, "the repository does not exist"),
        Some("RevisionNotFound") => {
            return fatal(Code::RevisionNotFound, "the revision does not exist")
        }
        Some("EntryNotFound") => return fatal(Code::FileNotFound, "the file does not exist"),
        Some("GatedRepo") => {
            return fatal(
                Code::AccessDenied,
                "the repository is gated; accept its terms and use a token with access",
            )
        }
        Some("DisabledRepo") => return fatal(Code::AccessDenied, "the repository is disabled"),
        _ => {}
    }
    match status {
        StatusCode::UNAUTHORIZED => fatal(
            Code::AccessDenied,
            "authentication required (set --hf-token / HF_TOKEN)",
        ),
        StatusCode::FORBIDDEN => fatal(Code::AccessDenied, "access denied for this token"),
        StatusCode::NOT_FOUND => fatal(not_found, "not found"),
        StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => {
            HubError::Transient(format!("{what}: HTTP {status}"))
        }
        s if s.is_server_error() => HubError::Transient(format!("{what}: HTTP {status}")),
        s => fatal(Code::HubUnavailable, &format!("unexpected answer {s}")),
    }
}

fn transport(what: &str, err: &reqwest::Error) -> HubError {
    HubError::Transient(format!("{what}: {}", crate::util::error_chain(err)))
}

/// Largest repository listing read from a hub (the real ones are a few hundred KiB).
const MAX_LISTING_BYTES: usize = 32 << 20;

/// A response body, refused past `max` bytes (a hostile hub cannot exhaust memory).
async fn read_capped(
    mut response: reqwest::Response,
    max: usize,
    what: &str,
) -> Result<Vec<u8>, HubError> {
    let too_big = || {
        HubError::Fatal(DownloadFailure::new(
            Code::HubUnavailable,
            format!("{what}: the listing is larger than {max} bytes"),
        ))
    };
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| transport(what, &e))? {
        if body.len() + chunk.len() > max {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit and every blob name become file names in the cache: they must be the hashes they
/// claim to be (40 or 64 hex digits), never a path.
fn check_listing(listing: &Listing) -> Result<(), String> {
    if !is_hex(&listing.commit, 40) {
        return Err(format!(
            "a commit that is not 40 hex digits: {:?}",
            listing.commit.chars().take(80).collect::<String>()
        ));
    }
    for f in &listing.files {
        let expected = if f.lfs { 64 } else { 40 };
        if !(is_hex(&f.etag, expected) || (!f.lfs && is_hex(&f.etag, 64))) {
            return Err(format!(
                "a hash for {:?} that is not {expected} hex digits: {:?}",
                f.path,
                f.etag.chars().take(80).collect::<String>()
            ));
        }
    }
    Ok(())
}

/// One file of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub path: String,
    pub size: u64,
    /// The blob name: sha256 of the content for LFS files, git blob sha1 otherwise.
    pub etag: String,
    pub lfs: bool,
}

/// A revision's files.
#[derive(Debug, Clone)]
pub struct Listing {
    pub commit: String,
    pub files: Vec<RemoteFile>,
}

#[derive(Debug, Deserialize)]
struct Info {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// Retry settings.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    pub fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.attempts)
            .with_jitter()
    }
}

/// Talks to one hub endpoint.
pub struct HubClient {
    api: Api,
    endpoint: String,
    retry: RetryPolicy,
}

impl HubClient {
    pub fn new(endpoint: &str, token: Option<&Secret>, retry: RetryPolicy) -> Result<Self, String> {
        let api = ApiBuilder::new()
            .with_endpoint(endpoint.to_owned())
            .with_token(token.map(|t| t.expose().to_owned()))
            .with_progress(false)
            .with_user_agent("lmx", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| format!("building the hub client: {e}"))?;
        Ok(Self {
            api,
            endpoint: endpoint.to_owned(),
            retry,
        })
    }

    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    fn repo(&self, repo_id: &str, revision: &str) -> hf_hub::api::tokio::ApiRepo {
        self.api.repo(Repo::with_revision(
            repo_id.to_owned(),
            RepoType::Model,
            revision.to_owned(),
        ))
    }

    /// The URL of a file at a commit.
    pub fn file_url(&self, repo_id: &str, commit: &str, path: &str) -> String {
        self.repo(repo_id, commit).url(path)
    }

    /// Lists a revision's files with sizes and hashes, retrying transient failures.
    pub async fn listing(&self, repo_id: &str, revision: &str) -> Result<Listing, DownloadFailure> {
        let what = format!("listing {repo_id}@{revision} on {}", self.endpoint);
        let info = (|| self.info_once(repo_id, revision, &what))
            .retry(self.retry.backoff())
            .when(HubError::is_transient)
            .notify(|e, delay| tracing::warn!(error = ?e, ?delay, "retrying the hub"))
            .await
            .map_err(|e| e.into_failure(&what))?;
        let mut files = Vec::with_capacity(info.siblings.len());
        for s in info.siblings {
            let (etag, size, lfs) = match (s.lfs, s.blob_id, s.size) {
                (Some(lfs), _, _) => (lfs.sha256, lfs.size, true),
                (None, Some(blob), Some(size)) => (blob, size, false),
                _ => {
                    let (etag, size) = self.metadata(repo_id, &info.sha, &s.rfilename).await?;
                    let lfs = etag.len() == 64;
                    (etag, size, lfs)
                }
            };
            files.push(RemoteFile {
                path: s.rfilename,
                size,
                etag: etag.trim_matches('"').to_ascii_lowercase(),
                lfs,
            });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let listing = Listing {
            commit: info.sha.to_ascii_lowercase(),
            files,
        };
        check_listing(&listing).map_err(|message| {
            DownloadFailure::new(Code::Internal, format!("{what}: the hub sent {message}"))
        })?;
        Ok(listing)
    }

    async fn info_once(&self, repo_id: &str, revision: &str, what: &str) -> Result<Info, HubError> {
        let response = self
            .repo(repo_id, revision)
            .info_request()
            .query(&[("blobs", "true")])
            .send()
            .await
            .map_err(|e| transport(what, &e))?;
        let status = response.status();
        if !status.is_success() {
            let code = response
                .headers()
                .get("x-error-code")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return Err(classify(status, code.as_deref(), Code::RepoNotFound, what));
        }
        let body = read_capped(response, MAX_LISTING_BYTES, what).await?;
        serde_json::from_slice::<Info>(&body).map_err(|e| {
            HubError::Fatal(DownloadFailure::new(
                Code::HubUnavailable,
                format!("{what}: the listing does not parse: {e}"),
            ))
        })
    }

    /// A file's etag and size, from its resolve URL (for listings without hashes).
    pub async fn metadata(
        &self,
        repo_id: &str,
        commit: &str,
        path: &str,
    ) -> Result<(String, u64), DownloadFailure> {
        let what = format!("reading metadata of {path}");
        let url = self.file_url(repo_id, commit, path);
        (|| async {
            match self.api.metadata(&url).await {
                Ok(m) => Ok((m.etag().to_owned(), m.size() as u64)),
                Err(ApiError::RequestError(e)) => Err(match e.status() {
                    Some(status) => classify(status, None, Code::FileNotFound, &what),
                    None => transport(&what, &e),
                }),
                Err(e) => Err(HubError::Transient(format!("{what}: {e}"))),
            }
        })
        .retry(self.retry.backoff())
        .when(HubError::is_transient)
        .await
        .map_err(|e| e.into_failure(&what))
    }

    /// GET of bytes `start..end` (end exclusive) of `url`; one attempt.
    pub async fn get_range(
        &self,
        url: &str,
        start: u64,
        end: u64,
        what: &str,
    ) -> Result<reqwest::Response, HubError> {
        let response = self
            .api
            .client()
            .get(url)
            .header(header::RANGE, format!("bytes={start}-{}", end - 1))
            .send()
            .await
            .map_err(|e| transport(what, &e))?;
        let status = response.status();
        if status == StatusCode::PARTIAL_CONTENT || (status == StatusCode::OK && start == 0) {
            return Ok(response);
        }
        if status == StatusCode::OK {
            return Err(HubError::Fatal(DownloadFailure::new(
                Code::HubUnavailable,
                format!("{what}: the server ignored the Range header"),
            )));
        }
        let code = response
            .headers()
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Err(classify(status, code.as_deref(), Code::FileNotFound, what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_whose_hashes_are_paths_are_refused() {
        let file = |etag: &str, lfs: bool| RemoteFile {
            path: "model.safetensors".into(),
            size: 1,
            etag: etag.into(),
            lfs,
        };
        let listing = |commit: &str, f: RemoteFile| Listing {
            commit: commit.into(),
            files: vec![f],
        };
        let (sha1, sha256) = ("a".repeat(40), "b".repeat(64));
        assert!(check_listing(&listing(&sha1, file(&sha256, true))).is_ok());
        assert!(check_listing(&listing(&sha1, file(&sha1, false))).is_ok());
        for bad in [
            listing("../../../escape", file(&sha256, true)),
            listing(&sha1, file("../../../../evil", false)),
            listing(&sha1, file(&sha1, true)),
            listing(&format!("{sha1}/.."), file(&sha1, false)),
            listing(&sha1, file(&format!("{}/x", "c".repeat(38)), false)),
        ] {
            assert!(check_listing(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hub_answers_map_to_stable_codes() {
        let code = |status: u16, header: Option<&str>| match classify(
            StatusCode::from_u16(status).unwrap(),
            header,
            Code::RepoNotFound,
            "x",
        ) {
            HubError::Fatal(f) => Some(f.code),
            HubError::Transient(_) => None,
        };
        assert_eq!(code(404, Some("RepoNotFound")), Some(Code::RepoNotFound));
        assert_eq!(
            code(404, Some("RevisionNotFound")),
            Some(Code::RevisionNotFound)
        );
        assert_eq!(code(404, Some("EntryNotFound")), Some(Code::FileNotFound));
        assert_eq!(code(404, None), Some(Code::RepoNotFound));
        assert_eq!(code(401, None), Some(Code::AccessDenied));
        assert_eq!(code(403, Some("GatedRepo")), Some(Code::AccessDenied));
        assert_eq!(code(503, None), None);
        assert_eq!(code(429, None), None);
        assert_eq!(code(500, None), None);
        assert_eq!(code(418, None), Some(Code::HubUnavailable));
    }
}
