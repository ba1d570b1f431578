//! The hub stand-in (tests/common/hub.rs) itself: the API listing, HEAD metadata, GET with
//! ranges, error codes, gating, every fault type, byte accounting and the request log, with a
//! plain HTTP client; and Python's huggingface_hub downloading a snapshot from it.

mod common;

use std::{error::Error as _, time::Duration};

use bytes::Bytes;
use common::{
    hub::{Fault, HubServer, RequestLog},
    tools,
};
use http_body_util::{BodyExt, Empty};
use hyper::{body::Incoming, header::HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use lmx::testing::{self, RepoFiles};
use serde_json::Value;
use tokio::time::{timeout, Instant};

const COMMIT: &str = "1111111111111111111111111111111111111111";
const COMMIT2: &str = "2222222222222222222222222222222222222222";
const REPO: &str = "org/model";
const SHARD: &str = "model-00001-of-00002.safetensors";
/// Failure bound for anything that should finish promptly.
const BOUND: Duration = Duration::from_secs(20);

fn fixture() -> RepoFiles {
    let mut files = testing::sharded_safetensors_repo(2, 4096);
    files.insert("sub/dir/notes.txt", b"nested file\n".to_vec());
    files
}

async fn hub_with_fixture() -> (HubServer, RepoFiles) {
    let hub = HubServer::start().await;
    let files = fixture();
    hub.add_repo(REPO, COMMIT, &["main", "refs/pr/1"], &files);
    (hub, files)
}

struct Http {
    client: Client<HttpConnector, Empty<Bytes>>,
    base: String,
}

impl Http {
    fn new(hub: &HubServer) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: hub.url(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Response<Incoming> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::new()).unwrap();
        timeout(BOUND, self.client.request(request))
            .await
            .expect("response in time")
            .expect("response")
    }

    /// Status, headers and the whole body (which must arrive intact).
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
        let response = self.send(Method::GET, path, headers).await;
        let (parts, mut body) = response.into_parts();
        let (bytes, error) = read_body(&mut body).await;
        assert!(error.is_none(), "GET {path}: body error {error:?}");
        (parts.status, parts.headers, bytes)
    }

    async fn head(&self, path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap) {
        let response = self.send(Method::HEAD, path, headers).await;
        (response.status(), response.headers().clone())
    }

    async fn json(&self, path: &str) -> Value {
        let (status, headers, body) = self.get(path, &[]).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(header(&headers, "content-type").starts_with("application/json"));
        serde_json::from_slice(&body).expect("JSON body")
    }
}

/// The body until its end or an error.
async fn read_body(body: &mut Incoming) -> (Vec<u8>, Option<hyper::Error>) {
    let mut bytes = Vec::new();
    loop {
        match timeout(BOUND, body.frame())
            .await
            .expect("body frame in time")
        {
            None => return (bytes, None),
            Some(Err(e)) => return (bytes, Some(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
        }
    }
}

/// Reads until at least `want` bytes arrived.
async fn read_at_least(body: &mut Incoming, want: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    while bytes.len() < want {
        let frame = timeout(BOUND, body.frame())
            .await
            .expect("body frame in time")
            .expect("more body")
            .expect("body frame");
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    bytes
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
        .to_str()
        .unwrap()
}

fn resolve(rev: &str, path: &str) -> String {
    format!("/{REPO}/resolve/{rev}/{path}")
}

fn io_error_kind(error: &hyper::Error) -> Option<std::io::ErrorKind> {
    let mut source = error.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = e.source();
    }
    None
}

#[tokio::test]
async fn api_lists_files_with_sizes_blob_ids_and_lfs_hashes() {
    let (hub, files) = hub_with_fixture().await;
    hub.add_repo("solo", COMMIT2, &["main"], &files);
    let http = Http::new(&hub);

    for path in [
        "/api/models/org/model/revision/main?blobs=true&expand[]=siblings",
        "/api/models/org/model",
        "/api/models/org/model/revision/refs%2Fpr%2F1",
        "/api/models/org/model/revision/refs/pr/1",
        "/api/models/org/model/revision/1111111111111111111111111111111111111111",
    ] {
        let info = http.json(path).await;
        assert_eq!(info["id"], REPO, "{path}");
        assert_eq!(info["modelId"], REPO);
        assert_eq!(info["sha"], COMMIT);
        assert_eq!(info["private"], false);
        assert_eq!(info["gated"], false);
        assert_eq!(info["lastModified"], "2024-01-01T00:00:00.000Z");
        let siblings = info["siblings"].as_array().unwrap();
        assert_eq!(siblings.len(), files.0.len());
        for sibling in siblings {
            let name = sibling["rfilename"].as_str().unwrap();
            let bytes = files.get(name).expect("listed file exists");
            assert_eq!(sibling["size"], bytes.len() as u64, "{name}");
            let blob_id = sibling["blobId"].as_str().unwrap();
            assert_eq!(blob_id.len(), 40);
            if testing::is_lfs(name) {
                assert_eq!(
                    sibling["lfs"]["sha256"],
                    testing::etag(name, bytes),
                    "{name}"
                );
                assert_eq!(sibling["lfs"]["size"], bytes.len() as u64);
                assert!(sibling["lfs"]["pointerSize"].as_u64().unwrap() > 100);
            } else {
                assert!(sibling.get("lfs").is_none(), "{name}");
                assert_eq!(blob_id, testing::etag(name, bytes), "{name}");
            }
        }
    }
    let solo = http.json("/api/models/solo/revision/main").await;
    assert_eq!(solo["id"], "solo");
    assert_eq!(solo["sha"], COMMIT2);

    // The tree listing huggingface_hub's snapshot_download uses.
    let tree = http
        .json(&format!(
            "/api/models/{REPO}/tree/{COMMIT}?recursive=true&expand=false"
        ))
        .await;
    let tree = tree.as_array().unwrap();
    let listed: Vec<&str> = tree
        .iter()
        .filter(|e| e["type"] == "file")
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        files.0.keys().map(String::as_str).collect::<Vec<_>>()
    );
    let folders: Vec<&str> = tree
        .iter()
        .filter(|e| e["type"] == "directory")
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(folders, ["sub", "sub/dir"]);
    let shard = tree.iter().find(|e| e["path"] == SHARD).unwrap();
    assert_eq!(shard["lfs"]["oid"], testing::etag(SHARD, &files.0[SHARD]));
    // Not recursive: the top-level files and the folder "sub".
    let top = http.json(&format!("/api/models/{REPO}/tree/main")).await;
    assert_eq!(top.as_array().unwrap().len(), files.0.len());
    assert_eq!(top[0]["path"], "sub");
    let sub = http
        .json(&format!("/api/models/{REPO}/tree/main/sub%2Fdir"))
        .await;
    assert_eq!(sub[0]["path"], "sub/dir/notes.txt");
}

#[tokio::test]
async fn head_reports_etag_commit_and_size_for_lfs_and_small_files() {
    let (hub, files) = hub_with_fixture().await;
    let http = Http::new(&hub);

    let shard = &files.0[SHARD];
    let sha256 = testing::etag(SHARD, shard);
    let (status, headers) = http.head(&resolve("main", SHARD), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "etag"), format!("\"{sha256}\""));
    assert_eq!(header(&headers, "x-repo-commit"), COMMIT);
    assert_eq!(header(&headers, "content-length"), shard.len().to_string());
    assert_eq!(header(&headers, "accept-ranges"), "bytes");
    assert_eq!(header(&headers, "x-linked-etag"), format!("\"{sha256}\""));
    assert_eq!(header(&headers, "x-linked-size"), shard.len().to_string());

    let config = &files.0["config.json"];
    let (status, headers) = http.head(&resolve(COMMIT, "config.json"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        header(&headers, "etag"),
        format!("\"{}\"", testing::etag("config.json", config))
    );
    assert_eq!(header(&headers, "x-repo-commit"), COMMIT);
    assert_eq!(header(&headers, "content-length"), config.len().to_string());
    assert!(headers.get("x-linked-etag").is_none());
    assert!(headers.get("x-linked-size").is_none());
    assert_eq!(hub.total_bytes_sent(), 0, "HEAD sends no body");
}

#[tokio::test]
async fn get_returns_the_fixture_bytes_by_ref_commit_and_encoded_ref() {
    let (hub, files) = hub_with_fixture().await;
    let http = Http::new(&hub);
    for (path, bytes) in &files.0 {
        let (status, headers, body) = http.get(&resolve("main", path), &[]).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(&body, bytes, "{path}");
        assert_eq!(header(&headers, "content-length"), bytes.len().to_string());
        assert_eq!(
            header(&headers, "etag"),
            format!("\"{}\"", testing::etag(path, bytes))
        );
    }
    for rev in [COMMIT, "refs%2Fpr%2F1", "refs/pr/1"] {
        let (status, headers, body) = http.get(&resolve(rev, "sub/dir/notes.txt"), &[]).await;
        assert_eq!(status, StatusCode::OK, "{rev}");
        assert_eq!(header(&headers, "x-repo-commit"), COMMIT);
        assert_eq!(body, b"nested file\n");
    }
}

#[tokio::test]
async fn ranges_give_206_with_content_range_and_416_past_the_end() {
    let (hub, files) = hub_with_fixture().await;
    let http = Http::new(&hub);
    let shard = &files.0[SHARD];
    let size = shard.len();

    let (status, headers, body) = http
        .get(&resolve("main", SHARD), &[("range", "bytes=10-19")])
        .await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&headers, "content-range"),
        format!("bytes 10-19/{size}")
    );
    assert_eq!(header(&headers, "content-length"), "10");
    assert_eq!(body, shard[10..20]);

    let (status, headers, body) = http
        .get(&resolve("main", SHARD), &[("range", "bytes=1000-")])
        .await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&headers, "content-range"),
        format!("bytes 1000-{}/{size}", size - 1)
    );
    assert_eq!(
        header(&headers, "content-length"),
        (size - 1000).to_string()
    );
    assert_eq!(body, shard[1000..]);

    let (status, _, body) = http
        .get(&resolve("main", SHARD), &[("range", "bytes=-5")])
        .await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, shard[size - 5..]);

    let (status, _, body) = http
        .get(&resolve("main", SHARD), &[("range", "bytes=5-999999999")])
        .await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, shard[5..]);

    let past = format!("bytes={size}-");
    let (status, headers, body) = http.get(&resolve("main", SHARD), &[("range", &past)]).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&headers, "content-range"), format!("bytes */{size}"));
    assert!(body.is_empty());
}

#[tokio::test]
async fn missing_repo_revision_and_entry_have_their_error_codes() {
    let (hub, _) = hub_with_fixture().await;
    let http = Http::new(&hub);
    let cases = [
        ("/api/models/org/missing/revision/main", "RepoNotFound"),
        ("/api/models/missing", "RepoNotFound"),
        ("/api/models/org/model/revision/nope", "RevisionNotFound"),
        ("/org/missing/resolve/main/config.json", "RepoNotFound"),
        ("/org/model/resolve/nope/config.json", "RevisionNotFound"),
        (
            "/org/model/resolve/3333333333333333333333333333333333333333/config.json",
            "RevisionNotFound",
        ),
        ("/org/model/resolve/main/missing.json", "EntryNotFound"),
    ];
    for (path, code) in cases {
        let (status, headers, body) = http.get(path, &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "GET {path}");
        assert_eq!(header(&headers, "x-error-code"), code, "GET {path}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(body["error"].is_string());
        if code == "RepoNotFound" {
            assert_eq!(body["error"], "Repository Not Found");
        }
        if !path.starts_with("/api") {
            let (status, headers) = http.head(path, &[]).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "HEAD {path}");
            assert_eq!(header(&headers, "x-error-code"), code, "HEAD {path}");
        }
    }
}

#[tokio::test]
async fn gated_repo_wants_the_bearer_token() {
    let (hub, files) = hub_with_fixture().await;
    hub.set_gated(REPO, "hf_secret");
    let http = Http::new(&hub);
    let good = [("authorization", "Bearer hf_secret")];
    let bad = [("authorization", "Bearer hf_wrong")];
    let api = "/api/models/org/model/revision/main";
    let file = resolve("main", "config.json");

    for path in [api, file.as_str()] {
        for (headers, expected) in [
            (&[][..], StatusCode::UNAUTHORIZED),
            (&bad[..], StatusCode::FORBIDDEN),
        ] {
            let (status, response_headers, _) = http.get(path, headers).await;
            assert_eq!(status, expected, "GET {path} {headers:?}");
            assert_eq!(header(&response_headers, "x-error-code"), "GatedRepo");
            let (status, response_headers) = http.head(path, headers).await;
            assert_eq!(status, expected, "HEAD {path} {headers:?}");
            assert_eq!(header(&response_headers, "x-error-code"), "GatedRepo");
        }
    }
    let info = http.get(api, &good).await;
    assert_eq!(info.0, StatusCode::OK);
    let (status, _) = http.head(&file, &good).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = http.get(&file, &good).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, files.0["config.json"]);

    let log = hub.requests();
    assert!(log.iter().any(|r| r.status == 401 && !r.authorized));
    assert!(log.iter().any(|r| r.status == 403 && r.authorized));
}

#[tokio::test]
async fn a_second_commit_moves_the_refs_and_keeps_the_first_by_sha() {
    let (hub, _) = hub_with_fixture().await;
    let mut files2 = RepoFiles::default();
    files2.insert("config.json", b"{\"v\":2}".to_vec());
    hub.add_repo(REPO, COMMIT2, &["main"], &files2);
    let http = Http::new(&hub);

    let info = http.json("/api/models/org/model").await;
    assert_eq!(info["sha"], COMMIT2);
    assert_eq!(info["siblings"].as_array().unwrap().len(), 1);
    let (_, headers, body) = http.get(&resolve("main", "config.json"), &[]).await;
    assert_eq!(header(&headers, "x-repo-commit"), COMMIT2);
    assert_eq!(body, b"{\"v\":2}");
    // refs/pr/1 still points at the first commit, which stays reachable by sha.
    let (_, headers, _) = http
        .get(&resolve("refs%2Fpr%2F1", "config.json"), &[])
        .await;
    assert_eq!(header(&headers, "x-repo-commit"), COMMIT);
    let (status, _, body) = http.get(&resolve(COMMIT, SHARD), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, fixture().0[SHARD]);
}

#[tokio::test]
async fn status_fault_answers_n_times_then_recovers() {
    let (hub, files) = hub_with_fixture().await;
    let http = Http::new(&hub);
    hub.inject(Fault::Status {
        path: Some(SHARD.into()),
        status: 503,
        times: 2,
    });
    // Other files and the API are unaffected.
    let (status, _, _) = http.get(&resolve("main", "config.json"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    http.json("/api/models/org/model").await;

    let (status, _) = http.head(&resolve("main", SHARD), &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, body) = http.get(&resolve("main", SHARD), &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.is_empty());
    let (status, _, body) = http.get(&resolve("main", SHARD), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, files.0[SHARD]);

    // path None: any request, the API included; faults go in injection order.
    hub.inject(Fault::Status {
        path: None,
        status: 429,
        times: 1,
    });
    hub.inject(Fault::Status {
        path: None,
        status: 500,
        times: 1,
    });
    let (status, _, _) = http.get("/api/models/org/model", &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let (status, _, _) = http.get(&resolve("main", "config.json"), &[]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    http.json("/api/models/org/model").await;

    let statuses: Vec<u16> = hub.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 503, 503, 200, 429, 500, 200]);
}

#[tokio::test]
async fn reset_after_breaks_the_connection_mid_body() {
    let (hub, files) = hub_with_fixture().await;
    let http = Http::new(&hub);
    hub.inject(Fault::ResetAfter {
        path: SHARD.into(),
        bytes: 1000,
        times: 1,
    });
    let response = http.send(Method::GET, &resolve("main", SHARD), &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(response.headers(), "content-length"),
        files.0[SHARD].len().to_string()
    );
    let (bytes, error) = read_body(&mut response.into_body()).await;
    let error = error.expect("the body fails");
    assert_eq!(bytes, files.0[SHARD][..1000]);
    assert_eq!(
        io_error_kind(&error),
        Some(std::io::ErrorKind::ConnectionReset),
        "{error:?}"
    );
    assert_eq!(hub.bytes_sent(REPO, SHARD), 1000);

    // Consumed: the next GET is whole.
    let (_, _, body) = http.get(&resolve("main", SHARD), &[]).await;
    assert_eq!(body, files.0[SHARD]);
}

#[tokio::test]
async fn truncate_ends_the_body_early_despite_the_content_length() {
    let (hub, files) = hub_with_fixture().await;
    let http = Http::new(&hub);
    hub.inject(Fault::Truncate {
        path: SHARD.into(),
        bytes: 5000,
        times: 2,
    });
    for _ in 0..2 {
        let response = http.send(Method::GET, &resolve("main", SHARD), &[]).await;
        assert_eq!(
            header(response.headers(), "content-length"),
            files.0[SHARD].len().to_string()
        );
        let (bytes, error) = read_body(&mut response.into_body()).await;
        assert_eq!(bytes, files.0[SHARD][..5000]);
        let error = error.expect("a short body is an error for the client");
        // An orderly close short of Content-Length, not a reset.
        assert_eq!(
            io_error_kind(&error),
            Some(std::io::ErrorKind::UnexpectedEof),
            "{error:?}"
        );
    }
    let (_, _, body) = http.get(&resolve("main", SHARD), &[]).await;
    assert_eq!(body, files.0[SHARD]);
    assert_eq!(
        hub.bytes_sent(REPO, SHARD),
        2 * 5000 + files.0[SHARD].len() as u64
    );
}

#[tokio::test]
async fn wrong_bytes_keep_the_size_and_the_advertised_hash() {
    let (hub, files) = hub_with_fixture().await;
    let http = Http::new(&hub);
    let shard = &files.0[SHARD];
    hub.inject(Fault::WrongBytes {
        path: SHARD.into(),
        times: 1,
    });
    // HEAD does not consume it and still advertises the right hash.
    let (_, headers) = http.head(&resolve("main", SHARD), &[]).await;
    assert_eq!(
        header(&headers, "x-linked-etag"),
        format!("\"{}\"", testing::etag(SHARD, shard))
    );
    let (status, headers, body) = http.get(&resolve("main", SHARD), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        header(&headers, "etag"),
        format!("\"{}\"", testing::etag(SHARD, shard))
    );
    assert_eq!(body.len(), shard.len());
    assert!(body.iter().zip(shard).all(|(a, b)| a != b));
    let (_, _, body) = http.get(&resolve("main", SHARD), &[]).await;
    assert_eq!(&body, shard);
}

#[tokio::test]
async fn stall_stops_sending_without_closing() {
    let (hub, files) = hub_with_fixture().await;
    let http = Http::new(&hub);
    hub.inject(Fault::Stall {
        path: SHARD.into(),
        after: 3000,
        times: 1,
    });
    let response = http.send(Method::GET, &resolve("main", SHARD), &[]).await;
    let mut body = response.into_body();
    let bytes = read_at_least(&mut body, 3000).await;
    assert_eq!(bytes, files.0[SHARD][..3000]);
    // The client's read timeout is what ends it: nothing more comes, and no end either.
    let next = timeout(Duration::from_millis(300), body.frame()).await;
    assert!(next.is_err(), "expected a stall, got {next:?}");
    drop(body);
    assert_eq!(hub.bytes_sent(REPO, SHARD), 3000);

    let (_, _, body) = http.get(&resolve("main", SHARD), &[]).await;
    assert_eq!(body, files.0[SHARD]);
}

#[tokio::test]
async fn hold_pauses_until_release() {
    let (hub, files) = hub_with_fixture().await;
    let http = Http::new(&hub);
    hub.inject(Fault::Hold {
        path: SHARD.into(),
        after: 2000,
        times: 1,
    });
    let response = http.send(Method::GET, &resolve("main", SHARD), &[]).await;
    let mut body = response.into_body();
    let mut bytes = read_at_least(&mut body, 2000).await;
    assert_eq!(bytes, files.0[SHARD][..2000]);
    timeout(BOUND, hub.wait_held(SHARD))
        .await
        .expect("held (returns at once)");
    assert_eq!(hub.bytes_sent(REPO, SHARD), 2000);
    hub.release();
    let (rest, error) = read_body(&mut body).await;
    assert!(error.is_none(), "{error:?}");
    bytes.extend(rest);
    assert_eq!(bytes, files.0[SHARD]);
}

#[tokio::test]
async fn wait_held_waits_for_a_transfer_to_reach_the_hold() {
    let (hub, files) = hub_with_fixture().await;
    hub.inject(Fault::Hold {
        path: SHARD.into(),
        after: 0,
        times: 1,
    });
    let url = resolve("main", SHARD);
    let download = {
        let client = Http::new(&hub);
        let url = url.clone();
        tokio::spawn(async move { client.get(&url, &[]).await })
    };
    timeout(BOUND, hub.wait_held(SHARD))
        .await
        .expect("the transfer reaches the hold");
    assert_eq!(hub.bytes_sent(REPO, SHARD), 0);
    hub.release();
    let (status, _, body) = timeout(BOUND, download).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, files.0[SHARD]);
    // The hold was consumed: the next GET goes straight through.
    let (_, _, body) = Http::new(&hub).get(&url, &[]).await;
    assert_eq!(body, files.0[SHARD]);
}

#[tokio::test]
async fn throttle_slows_every_body() {
    let hub = HubServer::start().await;
    let files = testing::sharded_safetensors_repo(1, 65536);
    let shard = "model-00001-of-00001.safetensors";
    hub.add_repo(REPO, COMMIT, &["main"], &files);
    let http = Http::new(&hub);
    let size = files.0[shard].len() as f64;
    let rate = 1024.0 * 1024.0;
    hub.inject(Fault::Throttle {
        bytes_per_second: rate as u64,
    });
    let started = Instant::now();
    let (_, _, body) = http.get(&resolve("main", shard), &[]).await;
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(body, files.0[shard]);
    // The last 64 KiB chunk may go at once; everything before it is paced.
    let floor = (size - 65536.0) / rate;
    assert!(floor > 0.4);
    assert!(
        elapsed >= floor,
        "{size} bytes in {elapsed:.3}s at {rate} B/s"
    );

    hub.inject(Fault::Throttle {
        bytes_per_second: 0,
    });
    let (_, _, body) = http.get(&resolve("main", shard), &[]).await;
    assert_eq!(body, files.0[shard]);
}

#[tokio::test]
async fn bytes_sent_counts_bodies_and_the_log_records_requests() {
    let (hub, files) = hub_with_fixture().await;
    let http = Http::new(&hub);
    let shard_len = files.0[SHARD].len() as u64;
    let config_len = files.0["config.json"].len() as u64;

    http.head(&resolve("main", SHARD), &[]).await;
    http.get(&resolve("main", SHARD), &[]).await;
    http.get(&resolve("refs%2Fpr%2F1", SHARD), &[("range", "bytes=0-99")])
        .await;
    http.get(
        &resolve("main", "config.json"),
        &[("authorization", "Bearer x")],
    )
    .await;
    http.get("/api/models/org/model/revision/main?blobs=true", &[])
        .await;

    assert_eq!(hub.bytes_sent(REPO, SHARD), shard_len + 100);
    assert_eq!(hub.bytes_sent(REPO, "config.json"), config_len);
    assert_eq!(hub.bytes_sent(REPO, "tokenizer.json"), 0);
    assert_eq!(hub.total_bytes_sent(), shard_len + 100 + config_len);

    let log = |method: &str, path: &str, range: Option<&str>, authorized, status| RequestLog {
        method: method.into(),
        path: path.into(),
        range: range.map(Into::into),
        authorized,
        status,
    };
    assert_eq!(
        hub.requests(),
        [
            log("HEAD", &resolve("main", SHARD), None, false, 200),
            log("GET", &resolve("main", SHARD), None, false, 200),
            log(
                "GET",
                &resolve("refs/pr/1", SHARD),
                Some("bytes=0-99"),
                false,
                206
            ),
            log("GET", &resolve("main", "config.json"), None, true, 200),
            log(
                "GET",
                "/api/models/org/model/revision/main",
                None,
                false,
                200
            ),
        ]
    );
}

/// Python's huggingface_hub downloads snapshots from the stand-in into the usual cache layout.
#[tokio::test]
async fn huggingface_hub_snapshot_download_works_against_it() {
    let Some(venv) = tools::venv() else { return };
    let python = venv.join("bin/python");
    let probe = tokio::process::Command::new(&python)
        .args(["-c", "import huggingface_hub"])
        .output()
        .await
        .expect("run python");
    if !probe.status.success() {
        let required = std::env::var("LMX_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "LMX_REQUIRE_TOOLS=1 but huggingface_hub is missing from {venv:?}"
        );
        eprintln!(
            "skipped: huggingface_hub is not installed in {}",
            venv.display()
        );
        return;
    }

    let (hub, files) = hub_with_fixture().await;
    let mut gated = RepoFiles::default();
    gated.insert("config.json", testing::config_json());
    hub.add_repo("gated-model", COMMIT2, &["main"], &gated);
    hub.set_gated("gated-model", "hf_token");
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("cache");
    let script = r#"
import sys
from huggingface_hub import snapshot_download
endpoint, cache = sys.argv[1], sys.argv[2]
print(snapshot_download("org/model", cache_dir=cache, endpoint=endpoint))
print(snapshot_download("org/model", revision="refs/pr/1", cache_dir=cache, endpoint=endpoint))
print(snapshot_download("gated-model", cache_dir=cache, endpoint=endpoint, token="hf_token"))

# The hub's error codes map to huggingface_hub's exceptions.
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
for error, kwargs in [
    (GatedRepoError, dict(repo_id="gated-model")),
    (GatedRepoError, dict(repo_id="gated-model", token="hf_wrong")),
    (RepositoryNotFoundError, dict(repo_id="org/missing")),
    (RevisionNotFoundError, dict(repo_id="org/model", revision="nope")),
]:
    try:
        snapshot_download(cache_dir=cache + "-empty", endpoint=endpoint, **kwargs)
    except error:
        pass
    else:
        sys.exit(f"no {error.__name__} for {kwargs}")
"#;
    let output = timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .args(["-c", script, &hub.url()])
            .arg(&cache)
            .env("HF_HOME", home.path().join("home"))
            .env("HF_HUB_DISABLE_TELEMETRY", "1")
            .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            .env_remove("HF_TOKEN")
            .env_remove("HF_ENDPOINT")
            .env_remove("HF_HUB_OFFLINE")
            .output(),
    )
    .await
    .expect("snapshot_download in time")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "snapshot_download failed: {}\nstdout: {stdout}\nstderr: {}\nrequests: {:#?}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        hub.requests()
    );

    let repo_dir = cache.join("models--org--model");
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    let printed: Vec<&str> = stdout.lines().collect();
    assert_eq!(printed[0], snapshot.to_str().unwrap());
    assert_eq!(printed[1], snapshot.to_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/refs/pr/1")).unwrap(),
        COMMIT
    );
    for (path, bytes) in &files.0 {
        let link = snapshot.join(path);
        assert!(link.symlink_metadata().unwrap().is_symlink(), "{path}");
        let blob = testing::blob_of(&snapshot, path);
        assert_eq!(
            blob,
            std::fs::canonicalize(repo_dir.join("blobs").join(testing::etag(path, bytes))).unwrap()
        );
        assert_eq!(&std::fs::read(&blob).unwrap(), bytes, "{path}");
    }
    let gated_config = cache
        .join("models--gated-model/snapshots")
        .join(COMMIT2)
        .join("config.json");
    assert_eq!(std::fs::read(gated_config).unwrap(), testing::config_json());
    // Every file was fetched once, whole (the second download found them cached).
    for (path, bytes) in &files.0 {
        assert_eq!(hub.bytes_sent(REPO, path), bytes.len() as u64, "{path}");
    }
    let statuses: Vec<u16> = hub.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s >= 400).count(),
        4,
        "{statuses:?}"
    );
}
