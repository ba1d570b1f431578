//! A stand-in for the Hugging Face hub, for integration tests: serves fixture repositories over
//! the hub's HTTP protocol on 127.0.0.1:0, with injectable faults.
//!
//! Endpoints (what lmx's client and Python's huggingface_hub use):
//! - `GET /api/models/{repo_id}[/revision/{rev}]`: repository info with `siblings` (sizes, blob
//!   ids, LFS sha256); query strings (`?blobs=true`, `expand[]=...`) are ignored.
//! - `GET /api/models/{repo_id}/tree/{rev}[/{path}][?recursive=true]`: the file listing
//!   huggingface_hub's `snapshot_download` uses (`list_repo_tree`), unpaginated.
//! - `HEAD`/`GET /{repo_id}/resolve/{rev}/{path}`: file metadata (`ETag`, `X-Repo-Commit`,
//!   `X-Linked-Etag`, `X-Linked-Size`, `Content-Length`) and content, with single byte ranges.
//!
//! `{repo_id}` is "org/name" or "name"; `{rev}` is a ref (URL-encoded when it contains '/',
//! though an unencoded one is matched too) or a commit sha. Errors carry the hub's
//! `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo).
//!
//! Faults act on the wire: the prefix a fault lets through is flushed to the socket before the
//! fault acts, so a client sees exactly those bytes. `ResetAfter` ends with a TCP reset (RST),
//! `Truncate` with an orderly close (FIN) short of `Content-Length`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{ready, Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode},
    response::Response,
    routing::any,
    Router,
};
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Largest body chunk handed to the connection.
const CHUNK: usize = 64 * 1024;
const LAST_MODIFIED: &str = "2024-01-01T00:00:00.000Z";

/// A fault to inject; those with `times` are consumed one per matching request, in injection
/// order (a request consumes at most one). `path` is the file's path inside the repository.
/// Body faults count bytes from the start of the body sent (of the range, for a 206); one
/// whose `bytes`/`after` reaches the body's length lets the whole body through and does nothing
/// more (the response is complete by then).
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer `status` (e.g. 503, 429, 500) with an empty body to the next `times` requests
    /// (HEAD or GET) for `path`; `None` matches any request, the API included.
    Status {
        path: Option<String>,
        status: u16,
        times: usize,
    },
    /// GET of `path`: headers and the first `bytes` body bytes, then a TCP reset (the client
    /// sees an error mid-body), for the next `times` requests.
    ResetAfter {
        path: String,
        bytes: u64,
        times: usize,
    },
    /// GET of `path`: correct headers (full Content-Length), then the connection closes cleanly
    /// after `bytes` body bytes.
    Truncate {
        path: String,
        bytes: u64,
        times: usize,
    },
    /// GET of `path`: same size, different bytes (HEAD and the API still advertise the right
    /// hash).
    WrongBytes { path: String, times: usize },
    /// GET of `path`: `after` body bytes, then nothing (no close) until the client gives up.
    Stall {
        path: String,
        after: u64,
        times: usize,
    },
    /// GET of `path`: `after` body bytes, then wait for [`HubServer::release`] before the rest.
    Hold {
        path: String,
        after: u64,
        times: usize,
    },
    /// Throttle every GET body to `bytes_per_second` (chunks of at most 64 KiB) from now on;
    /// a later Throttle replaces it, and 0 turns throttling off.
    Throttle { bytes_per_second: u64 },
}

/// One request as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLog {
    pub method: String,
    /// The URL path, percent-decoded (no query).
    pub path: String,
    /// The Range header, if any.
    pub range: Option<String>,
    /// Whether an Authorization header was sent.
    pub authorized: bool,
    pub status: u16,
}

/// The hub server; stops when dropped.
pub struct HubServer {
    addr: SocketAddr,
    hub: Arc<Hub>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl HubServer {
    /// Binds 127.0.0.1:0 and serves in a background tokio task; stops when dropped.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let hub = Arc::new(Hub::default());
        let stop = CancellationToken::new();
        let router = Router::new()
            .route("/api/models/{*rest}", any(api))
            .fallback(files)
            .with_state(hub.clone());
        let task = tokio::spawn(accept_loop(listener, router, stop.clone()));
        Self {
            addr,
            hub,
            stop,
            task,
        }
    }

    /// "http://127.0.0.1:PORT" (the value for HF_ENDPOINT / --hub-endpoint).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `files` as repository `repo_id` at `commit` (40 hex), with each ref in `refs`
    /// (branch/tag names, may contain '/') pointing at it. Calling it again for the same repo
    /// adds another commit (the refs named move to it; earlier commits stay reachable by sha).
    pub fn add_repo(
        &self,
        repo_id: &str,
        commit: &str,
        refs: &[&str],
        files: &lmx::testing::RepoFiles,
    ) {
        assert!(
            commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
            "commit must be 40 hex digits: {commit:?}"
        );
        assert!(
            !repo_id.is_empty() && repo_id.split('/').count() <= 2,
            "repo id must be \"org/name\" or \"name\": {repo_id:?}"
        );
        let snapshot = Arc::new(Snapshot {
            commit: commit.to_owned(),
            files: files
                .0
                .iter()
                .map(|(path, bytes)| (path.clone(), Arc::new(Entry::new(path, bytes))))
                .collect(),
        });
        let mut inner = self.hub.lock();
        let repo = inner.repos.entry(repo_id.to_owned()).or_default();
        repo.commits.insert(commit.to_owned(), snapshot);
        for name in refs {
            repo.refs.insert((*name).to_owned(), commit.to_owned());
        }
    }

    /// Requires `Authorization: Bearer <token>` for this repo (API, HEAD and GET): missing →
    /// 401, wrong → 403, both with `X-Error-Code: GatedRepo`.
    pub fn set_gated(&self, repo_id: &str, token: &str) {
        self.hub
            .lock()
            .gated
            .insert(repo_id.to_owned(), token.to_owned());
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        if let Fault::Status { status, .. } = &fault {
            assert!(
                StatusCode::from_u16(*status).is_ok(),
                "not an HTTP status: {status}"
            );
        }
        let mut inner = self.hub.lock();
        match fault {
            Fault::Throttle { bytes_per_second } => {
                inner.throttle = (bytes_per_second > 0).then_some(bytes_per_second)
            }
            fault if remaining(&fault) > 0 => inner.faults.push(fault),
            _ => {}
        }
    }

    /// Body bytes sent to clients for this file (GET only), across all requests: counted as
    /// each chunk is handed to the connection (a fault's prefix is on the socket before the
    /// fault acts).
    pub fn bytes_sent(&self, repo_id: &str, path: &str) -> u64 {
        let inner = self.hub.lock();
        inner
            .sent
            .get(&(repo_id.to_owned(), path.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Total body bytes sent for all files.
    pub fn total_bytes_sent(&self) -> u64 {
        self.hub.lock().sent.values().sum()
    }

    /// Every request so far, in the order their responses started.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.hub.lock().log.clone()
    }

    /// Waits until a transfer of `path` is being held by a [`Fault::Hold`] (at once if one
    /// already is). The held prefix has then been written to the socket.
    pub async fn wait_held(&self, path: &str) {
        let mut held = self.hub.held.subscribe();
        held.wait_for(|held| held.get(path).is_some_and(|n| *n > 0))
            .await
            .expect("hub state outlives its server");
    }

    /// Lets every held transfer continue.
    pub fn release(&self) {
        self.hub.released.send_modify(|generation| *generation += 1);
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// State.

#[derive(Default)]
struct Hub {
    inner: Mutex<Inner>,
    /// Transfers being held, by file path.
    held: watch::Sender<HashMap<String, usize>>,
    /// Bumped by `release`.
    released: watch::Sender<u64>,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct Inner {
    repos: HashMap<String, Repo>,
    gated: HashMap<String, String>,
    faults: Vec<Fault>,
    throttle: Option<u64>,
    sent: HashMap<(String, String), u64>,
    log: Vec<RequestLog>,
}

#[derive(Default)]
struct Repo {
    commits: HashMap<String, Arc<Snapshot>>,
    refs: HashMap<String, String>,
}

impl Repo {
    fn resolve(&self, rev: &str) -> Option<&Arc<Snapshot>> {
        let commit = self.refs.get(rev).map_or(rev, String::as_str);
        self.commits.get(commit)
    }
}

struct Snapshot {
    commit: String,
    files: BTreeMap<String, Arc<Entry>>,
}

struct Entry {
    bytes: Bytes,
    /// Git blob id: of the content, or of the LFS pointer for LFS files (as on the hub).
    blob_id: String,
    /// sha256 for LFS files, git blob sha1 otherwise (`lmx::testing::etag`).
    etag: String,
    /// (sha256, pointer size) for LFS files.
    lfs: Option<(String, u64)>,
}

impl Entry {
    fn new(path: &str, bytes: &[u8]) -> Self {
        let etag = lmx::testing::etag(path, bytes);
        let (blob_id, lfs) = if lmx::testing::is_lfs(path) {
            let pointer = format!(
                "version https://git-lfs.github.com/spec/v1\noid sha256:{etag}\nsize {}\n",
                bytes.len()
            );
            (
                git_blob_id(pointer.as_bytes()),
                Some((etag.clone(), pointer.len() as u64)),
            )
        } else {
            (etag.clone(), None)
        };
        Self {
            bytes: Bytes::copy_from_slice(bytes),
            blob_id,
            etag,
            lfs,
        }
    }

    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
}

fn git_blob_id(bytes: &[u8]) -> String {
    lmx::snapshot::git_sha1_hex(bytes, bytes.len() as u64)
        .expect("hash in memory")
        .0
}

fn remaining(fault: &Fault) -> usize {
    match fault {
        Fault::Status { times, .. }
        | Fault::ResetAfter { times, .. }
        | Fault::Truncate { times, .. }
        | Fault::WrongBytes { times, .. }
        | Fault::Stall { times, .. }
        | Fault::Hold { times, .. } => *times,
        Fault::Throttle { .. } => 0,
    }
}

impl Inner {
    /// Consumes the earliest-injected fault that applies: Status faults to any request for
    /// `file` (or any request at all when their path is None), body faults only to a GET that
    /// is about to send `file`'s content.
    fn take_fault(&mut self, file: Option<&str>, sends_body: bool) -> Option<Fault> {
        let index = self.faults.iter().position(|fault| match fault {
            Fault::Status { path, .. } => path.is_none() || path.as_deref() == file,
            Fault::ResetAfter { path, .. }
            | Fault::Truncate { path, .. }
            | Fault::WrongBytes { path, .. }
            | Fault::Stall { path, .. }
            | Fault::Hold { path, .. } => sends_body && Some(path.as_str()) == file,
            Fault::Throttle { .. } => false,
        })?;
        let fault = self.faults[index].clone();
        match &mut self.faults[index] {
            Fault::Status { times, .. }
            | Fault::ResetAfter { times, .. }
            | Fault::Truncate { times, .. }
            | Fault::WrongBytes { times, .. }
            | Fault::Stall { times, .. }
            | Fault::Hold { times, .. } => {
                *times -= 1;
                if *times == 0 {
                    self.faults.remove(index);
                }
            }
            Fault::Throttle { .. } => unreachable!("never matched"),
        }
        Some(fault)
    }

    /// 404 RepoNotFound, or 401/403 GatedRepo, or the repository.
    fn open_repo(&self, repo_id: &str, auth: Option<&str>) -> Result<&Repo, Outcome> {
        let repo = self.repos.get(repo_id).ok_or_else(|| {
            Outcome::error(
                StatusCode::NOT_FOUND,
                "RepoNotFound",
                "Repository Not Found".into(),
            )
        })?;
        if let Some(token) = self.gated.get(repo_id) {
            let message = format!(
                "Access to model {repo_id} is restricted. You must have access to it and be \
                 authenticated to access it. Please log in."
            );
            match auth {
                None => {
                    return Err(Outcome::error(
                        StatusCode::UNAUTHORIZED,
                        "GatedRepo",
                        message,
                    ))
                }
                Some(auth) if auth != format!("Bearer {token}") => {
                    return Err(Outcome::error(StatusCode::FORBIDDEN, "GatedRepo", message))
                }
                Some(_) => {}
            }
        }
        Ok(repo)
    }
}

fn revision_not_found(rev: &str) -> Outcome {
    Outcome::error(
        StatusCode::NOT_FOUND,
        "RevisionNotFound",
        format!("Invalid rev id: {rev}"),
    )
}

/// Splits `segs` into a revision (one decoded segment, or several joined with '/' when that
/// names a known ref) and the rest; `min_rest` segments must remain.
fn split_revision(segs: &[String], repo: Option<&Repo>, min_rest: usize) -> (String, String) {
    if let Some(repo) = repo {
        for k in 1..=segs.len().saturating_sub(min_rest) {
            let rev = segs[..k].join("/");
            if repo.resolve(&rev).is_some() {
                return (rev, segs[k..].join("/"));
            }
        }
    }
    (segs[0].clone(), segs[1..].join("/"))
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// What a request gets, before faults.
enum Outcome {
    Error {
        status: StatusCode,
        code: Option<&'static str>,
        message: String,
    },
    Json(Value),
    File {
        repo: String,
        path: String,
        commit: String,
        entry: Arc<Entry>,
    },
}

impl Outcome {
    fn error(status: StatusCode, code: &'static str, message: String) -> Self {
        Outcome::Error {
            status,
            code: Some(code),
            message,
        }
    }

    fn plain(status: StatusCode, message: &str) -> Self {
        Outcome::Error {
            status,
            code: None,
            message: message.into(),
        }
    }
}

/// Per-request facts the handlers need.
struct Call {
    method: Method,
    /// Raw path segments after the leading '/', each percent-decoded.
    segs: Vec<String>,
    query: String,
    auth: Option<String>,
    conn: Option<Arc<ConnCtl>>,
    log: RequestLog,
}

impl Call {
    fn new(req: &Request) -> Self {
        let header = |name: HeaderName| {
            req.headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let raw = req.uri().path();
        let mut segs: Vec<String> = raw
            .strip_prefix('/')
            .unwrap_or(raw)
            .split('/')
            .map(percent_decode)
            .collect();
        if segs.len() > 1 && segs.last().is_some_and(String::is_empty) {
            segs.pop();
        }
        let auth = header(header::AUTHORIZATION);
        Self {
            method: req.method().clone(),
            segs,
            query: req.uri().query().unwrap_or_default().to_owned(),
            conn: req.extensions().get::<Arc<ConnCtl>>().cloned(),
            log: RequestLog {
                method: req.method().to_string(),
                path: percent_decode(raw),
                range: header(header::RANGE),
                authorized: auth.is_some(),
                status: 0,
            },
            auth,
        }
    }

    fn reads(&self) -> bool {
        self.method == Method::GET || self.method == Method::HEAD
    }
}

async fn api(State(hub): State<Arc<Hub>>, req: Request) -> Response {
    let call = Call::new(&req);
    let outcome = {
        let inner = hub.lock();
        api_outcome(&inner, &call)
    };
    finish(&hub, call, outcome, None)
}

async fn files(State(hub): State<Arc<Hub>>, req: Request) -> Response {
    let call = Call::new(&req);
    let (outcome, file) = {
        let inner = hub.lock();
        file_outcome(&inner, &call)
    };
    finish(&hub, call, outcome, file)
}

/// `/api/models/...`.
fn api_outcome(inner: &Inner, call: &Call) -> Outcome {
    if !call.reads() {
        return Outcome::plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    enum Kind<'a> {
        Info(Option<&'a [String]>),
        Tree(&'a [String]),
    }
    let s = &call.segs[2..];
    let mut candidates = Vec::new();
    for n in [1, 2] {
        if s.len() < n || s[..n].iter().any(String::is_empty) {
            continue;
        }
        let rest = &s[n..];
        let kind = match rest.first().map(String::as_str) {
            None => Kind::Info(None),
            Some("revision") if rest.len() >= 2 => Kind::Info(Some(&rest[1..])),
            Some("tree") if rest.len() >= 2 => Kind::Tree(&rest[1..]),
            _ => continue,
        };
        candidates.push((s[..n].join("/"), kind));
    }
    let Some(index) = candidates
        .iter()
        .position(|(id, _)| inner.repos.contains_key(id))
        .or((!candidates.is_empty()).then_some(0))
    else {
        return Outcome::plain(StatusCode::NOT_FOUND, "Not Found");
    };
    let (repo_id, kind) = candidates.swap_remove(index);
    let repo = match inner.open_repo(&repo_id, call.auth.as_deref()) {
        Ok(repo) => repo,
        Err(outcome) => return outcome,
    };
    let gated = inner.gated.contains_key(&repo_id);
    match kind {
        Kind::Info(rev) => {
            let rev = rev.map_or_else(|| "main".to_owned(), |segs| segs.join("/"));
            match repo.resolve(&rev) {
                Some(snapshot) => Outcome::Json(info_json(&repo_id, snapshot, gated)),
                None => revision_not_found(&rev),
            }
        }
        Kind::Tree(segs) => {
            let (rev, dir) = split_revision(segs, Some(repo), 0);
            let Some(snapshot) = repo.resolve(&rev) else {
                return revision_not_found(&rev);
            };
            let recursive = query_param(&call.query, "recursive")
                .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
            match tree_json(snapshot, &dir, recursive) {
                Some(listing) => Outcome::Json(listing),
                None => Outcome::error(
                    StatusCode::NOT_FOUND,
                    "EntryNotFound",
                    format!("{dir} does not exist on \"{rev}\""),
                ),
            }
        }
    }
}

/// `/{repo_id}/resolve/{rev}/{path}`; also returns the file path (for faults).
fn file_outcome(inner: &Inner, call: &Call) -> (Outcome, Option<String>) {
    let s = &call.segs;
    let mut candidates = Vec::new();
    for n in [1, 2] {
        if s.len() >= n + 3 && s[n] == "resolve" && !s[..n].iter().any(String::is_empty) {
            candidates.push((s[..n].join("/"), &s[n + 1..]));
        }
    }
    let Some(index) = candidates
        .iter()
        .position(|(id, _)| inner.repos.contains_key(id))
        .or((!candidates.is_empty()).then_some(0))
    else {
        return (Outcome::plain(StatusCode::NOT_FOUND, "Not Found"), None);
    };
    let (repo_id, rest) = candidates.swap_remove(index);
    let (rev, path) = split_revision(rest, inner.repos.get(&repo_id), 1);
    let outcome = if !call.reads() {
        Outcome::plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
    } else {
        match inner.open_repo(&repo_id, call.auth.as_deref()) {
            Err(outcome) => outcome,
            Ok(repo) => match repo.resolve(&rev) {
                None => revision_not_found(&rev),
                Some(snapshot) => match snapshot.files.get(&path) {
                    None => Outcome::error(
                        StatusCode::NOT_FOUND,
                        "EntryNotFound",
                        "Entry not found".into(),
                    ),
                    Some(entry) => Outcome::File {
                        repo: repo_id.clone(),
                        path: path.clone(),
                        commit: snapshot.commit.clone(),
                        entry: entry.clone(),
                    },
                },
            },
        }
    };
    (outcome, Some(path))
}

/// Applies faults, builds the response and logs the request.
fn finish(hub: &Arc<Hub>, mut call: Call, outcome: Outcome, file: Option<String>) -> Response {
    let sends_body = call.method == Method::GET && matches!(outcome, Outcome::File { .. });
    let (fault, throttle) = {
        let mut inner = hub.lock();
        (
            inner.take_fault(file.as_deref(), sends_body),
            inner.throttle,
        )
    };
    let response = match (fault, outcome) {
        (Some(Fault::Status { status, .. }), _) => {
            let status = StatusCode::from_u16(status).expect("checked by inject");
            let mut response = Response::new(Body::empty());
            *response.status_mut() = status;
            response
        }
        (
            _,
            Outcome::Error {
                status,
                code,
                message,
            },
        ) => error_response(status, code, &message),
        (_, Outcome::Json(value)) => {
            let mut response = Response::new(Body::from(value.to_string()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            response
        }
        (
            fault,
            Outcome::File {
                repo,
                path,
                commit,
                entry,
            },
        ) => file_response(
            hub,
            &call,
            FileRef {
                repo,
                path,
                commit,
                entry,
            },
            fault,
            throttle,
        ),
    };
    call.log.status = response.status().as_u16();
    hub.lock().log.push(call.log);
    response
}

fn error_response(status: StatusCode, code: Option<&str>, message: &str) -> Response {
    let mut response = Response::new(Body::from(json!({ "error": message }).to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Some(code) = code {
        headers.insert("x-error-code", HeaderValue::from_str(code).unwrap());
    }
    if let Ok(value) = HeaderValue::from_str(message) {
        headers.insert("x-error-message", value);
    }
    response
}

struct FileRef {
    repo: String,
    path: String,
    commit: String,
    entry: Arc<Entry>,
}

fn file_response(
    hub: &Arc<Hub>,
    call: &Call,
    file: FileRef,
    fault: Option<Fault>,
    throttle: Option<u64>,
) -> Response {
    let entry = &file.entry;
    let size = entry.size();
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: String| {
        headers.insert(name, HeaderValue::from_str(&value).expect("ASCII header"));
    };
    set("etag", format!("\"{}\"", entry.etag));
    set("x-repo-commit", file.commit.clone());
    set("accept-ranges", "bytes".into());
    set("content-type", "application/octet-stream".into());
    if let Some((sha256, _)) = &entry.lfs {
        set("x-linked-etag", format!("\"{sha256}\""));
        set("x-linked-size", size.to_string());
    }
    let (status, span) = if call.method == Method::GET {
        match parse_range(call.log.range.as_deref(), size) {
            RangeRequest::Full => (StatusCode::OK, 0..size),
            RangeRequest::Part(first, last) => {
                set("content-range", format!("bytes {first}-{last}/{size}"));
                (StatusCode::PARTIAL_CONTENT, first..last + 1)
            }
            RangeRequest::Unsatisfiable => {
                let mut response = Response::new(Body::empty());
                *response.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                response.headers_mut().insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{size}")).unwrap(),
                );
                return response;
            }
        }
    } else {
        (StatusCode::OK, 0..size)
    };
    set("content-length", (span.end - span.start).to_string());
    let body = if call.method == Method::GET {
        let data = entry.bytes.slice(span.start as usize..span.end as usize);
        Body::from_stream(Transfer::new(hub, call, &file, data, fault, throttle).into_stream())
    } else {
        Body::empty()
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

enum RangeRequest {
    Full,
    /// First and last byte, inclusive.
    Part(u64, u64),
    Unsatisfiable,
}

/// A single `bytes=a-b`, `bytes=a-` or `bytes=-n` range; anything else is ignored (full body).
fn parse_range(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    let Some((first, last)) = spec.split_once('-') else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        return match last.parse::<u64>() {
            Err(_) => RangeRequest::Full,
            Ok(0) => RangeRequest::Unsatisfiable,
            Ok(_) if size == 0 => RangeRequest::Unsatisfiable,
            Ok(n) => RangeRequest::Part(size - n.min(size), size - 1),
        };
    }
    let Ok(first) = first.parse::<u64>() else {
        return RangeRequest::Full;
    };
    let last = if last.is_empty() {
        u64::MAX
    } else {
        match last.parse::<u64>() {
            Ok(last) if last >= first => last,
            _ => return RangeRequest::Full,
        }
    };
    if first >= size {
        RangeRequest::Unsatisfiable
    } else {
        RangeRequest::Part(first, last.min(size - 1))
    }
}

fn info_json(repo_id: &str, snapshot: &Snapshot, gated: bool) -> Value {
    let siblings: Vec<Value> = snapshot
        .files
        .iter()
        .map(|(path, entry)| {
            let mut sibling = json!({
                "rfilename": path,
                "size": entry.size(),
                "blobId": entry.blob_id,
            });
            if let Some((sha256, pointer_size)) = &entry.lfs {
                sibling["lfs"] = json!({
                    "sha256": sha256,
                    "size": entry.size(),
                    "pointerSize": pointer_size,
                });
            }
            sibling
        })
        .collect();
    let used_storage: u64 = snapshot.files.values().map(|e| e.size()).sum();
    json!({
        "_id": &git_blob_id(repo_id.as_bytes())[..24],
        "id": repo_id,
        "modelId": repo_id,
        "author": repo_id.split_once('/').map(|(org, _)| org),
        "sha": snapshot.commit,
        "lastModified": LAST_MODIFIED,
        "createdAt": LAST_MODIFIED,
        "private": false,
        "gated": if gated { json!("manual") } else { json!(false) },
        "disabled": false,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
        "usedStorage": used_storage,
    })
}

/// The tree listing of folder `dir` ("" = root): files and folders, like the hub's
/// `/api/models/{repo}/tree/{rev}/{dir}`; None when `dir` is no folder.
fn tree_json(snapshot: &Snapshot, dir: &str, recursive: bool) -> Option<Value> {
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let mut folders = BTreeSet::new();
    let mut files = Vec::new();
    for (path, entry) in &snapshot.files {
        let Some(rel) = path.strip_prefix(&prefix) else {
            continue;
        };
        let parts: Vec<&str> = rel.split('/').collect();
        for depth in 1..parts.len() {
            if depth == 1 || recursive {
                folders.insert(format!("{prefix}{}", parts[..depth].join("/")));
            }
        }
        if parts.len() == 1 || recursive {
            let mut file = json!({
                "type": "file",
                "oid": entry.blob_id,
                "size": entry.size(),
                "path": path,
            });
            if let Some((sha256, pointer_size)) = &entry.lfs {
                file["lfs"] = json!({
                    "oid": sha256,
                    "size": entry.size(),
                    "pointerSize": pointer_size,
                });
            }
            files.push(file);
        }
    }
    if !dir.is_empty() && files.is_empty() && folders.is_empty() {
        return None;
    }
    let mut listing: Vec<Value> = folders
        .into_iter()
        .map(|path| {
            json!({
                "type": "directory",
                "oid": git_blob_id(path.as_bytes()),
                "size": 0,
                "path": path,
            })
        })
        .collect();
    listing.extend(files);
    Some(Value::Array(listing))
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Bodies.

/// What happens once the fault's prefix is out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    None,
    Reset,
    Truncate,
    Stall,
    Hold,
}

/// A GET body: chunks of `data`, with the fault's action at `stop`, throttled when asked.
struct Transfer {
    hub: Arc<Hub>,
    conn: Option<Arc<ConnCtl>>,
    key: (String, String),
    data: Bytes,
    pos: usize,
    stop: usize,
    action: Action,
    throttle: Option<u64>,
    chunk: usize,
    started: Option<Instant>,
    /// The connection's flush count when the last chunk was handed over (or the first poll).
    flushes_seen: Option<u64>,
}

impl Transfer {
    fn new(
        hub: &Arc<Hub>,
        call: &Call,
        file: &FileRef,
        mut data: Bytes,
        fault: Option<Fault>,
        throttle: Option<u64>,
    ) -> Self {
        let len = data.len();
        let at = |bytes: u64| (bytes.min(len as u64)) as usize;
        let (stop, action) = match fault {
            Some(Fault::ResetAfter { bytes, .. }) => (at(bytes), Action::Reset),
            Some(Fault::Truncate { bytes, .. }) => (at(bytes), Action::Truncate),
            Some(Fault::Stall { after, .. }) => (at(after), Action::Stall),
            Some(Fault::Hold { after, .. }) => (at(after), Action::Hold),
            Some(Fault::WrongBytes { .. }) => {
                data = data.iter().map(|b| b ^ 0x5a).collect::<Vec<u8>>().into();
                (len, Action::None)
            }
            _ => (len, Action::None),
        };
        let chunk = throttle.map_or(CHUNK, |bps| (bps / 16).clamp(1, CHUNK as u64) as usize);
        Self {
            hub: hub.clone(),
            conn: call.conn.clone(),
            key: (file.repo.clone(), file.path.clone()),
            data,
            pos: 0,
            stop,
            action,
            throttle,
            chunk,
            started: None,
            flushes_seen: None,
        }
    }

    fn into_stream(self) -> impl futures::Stream<Item = io::Result<Bytes>> + Send {
        futures::stream::unfold(self, |mut transfer| async move {
            let item = transfer.next().await?;
            Some((item, transfer))
        })
    }

    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        let started = *self.started.get_or_insert_with(Instant::now);
        if self.flushes_seen.is_none() {
            self.flushes_seen = Some(self.flushes());
        }
        if self.pos == self.stop && self.action != Action::None {
            let action = std::mem::replace(&mut self.action, Action::None);
            self.wait_flushed().await;
            match action {
                Action::Reset => {
                    self.reset_connection().await;
                    return Some(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "injected fault: connection reset",
                    )));
                }
                Action::Truncate => return None,
                Action::Stall => std::future::pending::<()>().await,
                Action::Hold => self.hold().await,
                Action::None => {}
            }
            self.stop = self.data.len();
        }
        if self.pos >= self.stop {
            return None;
        }
        if let Some(bps) = self.throttle {
            let due = started + Duration::from_secs_f64(self.pos as f64 / bps as f64);
            tokio::time::sleep_until(due).await;
        }
        let end = self.stop.min(self.pos + self.chunk);
        let chunk = self.data.slice(self.pos..end);
        self.pos = end;
        self.flushes_seen = Some(self.flushes());
        *self.hub.lock().sent.entry(self.key.clone()).or_default() += chunk.len() as u64;
        Some(Ok(chunk))
    }

    fn flushes(&self) -> u64 {
        self.conn.as_ref().map_or(0, |conn| *conn.flushes.borrow())
    }

    /// Waits until the connection flushed everything handed over so far to the socket: the
    /// connection buffers a chunk before it polls the body again, and flushes whenever the body
    /// is pending.
    async fn wait_flushed(&self) {
        let (Some(conn), Some(seen)) = (&self.conn, self.flushes_seen) else {
            return;
        };
        let mut flushes = conn.flushes.subscribe();
        let _ = flushes.wait_for(|n| *n > seen).await;
    }

    /// Makes the connection's close a reset (SO_LINGER 0), once the peer acknowledged what was
    /// sent (a reset discards unacknowledged data).
    async fn reset_connection(&self) {
        let Some(conn) = &self.conn else { return };
        let deadline = Instant::now() + Duration::from_secs(10);
        while unsent_bytes(conn.fd).is_some_and(|n| n > 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: the fd belongs to this connection's socket, alive while its body is polled.
        unsafe {
            libc::setsockopt(
                conn.fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    async fn hold(&self) {
        let mut released = self.hub.released.subscribe();
        let generation = *released.borrow_and_update();
        let _held = HeldGuard::new(&self.hub, &self.key.1);
        let _ = released.wait_for(|g| *g != generation).await;
    }
}

/// Bytes in the socket's send queue not yet acknowledged by the peer.
#[cfg(target_os = "linux")]
fn unsent_bytes(fd: RawFd) -> Option<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (rc == 0).then_some(n)
}

#[cfg(not(target_os = "linux"))]
fn unsent_bytes(_fd: RawFd) -> Option<i32> {
    None
}

/// Counts a held transfer while it exists.
struct HeldGuard {
    hub: Arc<Hub>,
    path: String,
}

impl HeldGuard {
    fn new(hub: &Arc<Hub>, path: &str) -> Self {
        hub.held
            .send_modify(|held| *held.entry(path.to_owned()).or_default() += 1);
        Self {
            hub: hub.clone(),
            path: path.to_owned(),
        }
    }
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.hub.held.send_modify(|held| {
            if let Some(n) = held.get_mut(&self.path) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&self.path);
                }
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Connections.

/// Per connection: its socket and how often the connection flushed to it.
struct ConnCtl {
    fd: RawFd,
    flushes: watch::Sender<u64>,
}

async fn accept_loop(listener: TcpListener, router: Router, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        tokio::spawn(serve_connection(stream, router.clone(), stop.clone()));
    }
}

async fn serve_connection(stream: TcpStream, router: Router, stop: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let ctl = Arc::new(ConnCtl {
        fd: stream.as_raw_fd(),
        flushes: watch::channel(0).0,
    });
    let io = TokioIo::new(Tracked {
        inner: stream,
        ctl: ctl.clone(),
    });
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ctl.clone());
        router.clone().oneshot(req.map(Body::new))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(io, service);
    tokio::select! {
        _ = connection => {}
        _ = stop.cancelled() => {}
    }
}

/// The socket, counting completed flushes.
struct Tracked {
    inner: TcpStream,
    ctl: Arc<ConnCtl>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = ready!(Pin::new(&mut this.inner).poll_flush(cx));
        if result.is_ok() {
            this.ctl.flushes.send_modify(|n| *n += 1);
        }
        Poll::Ready(result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
