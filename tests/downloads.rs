//! Downloads over gRPC against the real server, pulling from a hub-protocol server in the test
//! (tests/common/hub.rs) with injected faults. Each test shows the stream the user sees and what
//! is left on disk.

mod common;

use std::{path::Path, time::Duration};

use common::{
    hub::{Fault, HubServer},
    TestServer,
};
use lmx::{pb, testing};
use tokio_stream::StreamExt;
use tonic::{transport::Channel, Code};
use tonic_types::StatusExt;

const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";
const WEIGHTS: &str = "model.safetensors";

type Admin = pb::model_admin_client::ModelAdminClient<Channel>;

/// A hub with the tiny llama as "tiny/llama" and a server pulling from it with fast retries.
async fn setup(configure: impl FnOnce(&mut lmx::Config)) -> (HubServer, TestServer, Admin) {
    let hub = HubServer::start().await;
    hub.add_repo("tiny/llama", C1, &["main"], &testing::tiny_repo("llama", 1));
    let url = hub.url();
    let server = TestServer::start_with(|c| {
        c.downloads.hub_endpoint = url;
        c.downloads.retry.min_delay = Duration::from_millis(5);
        c.downloads.retry.max_delay = Duration::from_millis(20);
        c.downloads.retry.attempts = 3;
        c.downloads.task.transfer.stall_timeout = Duration::from_millis(400);
        c.downloads.task.disk_margin = 0;
        configure(c);
    })
    .await;
    let admin = Admin::new(server.channel().await);
    (hub, server, admin)
}

fn request(model_id: &str) -> pb::DownloadModelRequest {
    pb::DownloadModelRequest {
        model_id: model_id.into(),
        ..Default::default()
    }
}

/// Every message of a DownloadModel stream, and the status it ended with (None: OK).
async fn download(
    admin: &mut Admin,
    req: pb::DownloadModelRequest,
) -> (Vec<pb::DownloadProgress>, Option<tonic::Status>) {
    let mut stream = match admin.download_model(req).await {
        Ok(r) => r.into_inner(),
        Err(status) => return (Vec::new(), Some(status)),
    };
    let mut messages = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(m) => messages.push(m.progress.unwrap()),
            Err(status) => return (messages, Some(status)),
        }
    }
    (messages, None)
}

fn repo_dir(server: &TestServer, repo: &str) -> std::path::PathBuf {
    server
        .cache_dir()
        .join(format!("models--{}", repo.replace('/', "--")))
}

fn blobs(server: &TestServer, repo: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo_dir(server, repo).join("blobs"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn weights_etag() -> String {
    let files = testing::tiny_repo("llama", 1);
    testing::etag(WEIGHTS, &files.0[WEIGHTS])
}

fn weights_size() -> u64 {
    testing::tiny_repo("llama", 1).0[WEIGHTS].len() as u64
}

/// Asserts the stream failed with `code`: terminal FAILED message, then a status with ErrorInfo.
fn assert_failed(
    messages: &[pb::DownloadProgress],
    status: Option<tonic::Status>,
    code: pb::DownloadErrorCode,
    grpc: Code,
) {
    let last = messages.last().expect("a terminal message");
    assert_eq!(last.state(), pb::DownloadState::Failed, "{last:?}");
    assert_eq!(last.error_code(), code, "{}", last.error_message);
    assert!(!last.error_message.is_empty());
    let status = status.expect("an error status after the terminal message");
    assert_eq!(status.code(), grpc, "{status:?}");
    let reason = code
        .as_str_name()
        .trim_start_matches("DOWNLOAD_ERROR_CODE_");
    assert_eq!(status.get_details_error_info().unwrap().reason, reason);
}

#[tokio::test]
async fn a_download_streams_progress_and_lays_out_the_hf_cache() {
    let (hub, server, mut admin) = setup(|_| {}).await;
    let files = testing::tiny_repo("llama", 1);
    let (messages, status) = download(&mut admin, request("tiny/llama")).await;
    assert!(status.is_none(), "{status:?}");
    let states: Vec<pb::DownloadState> = messages.iter().map(|m| m.state()).collect();
    assert_eq!(states.first(), Some(&pb::DownloadState::Queued));
    assert!(states.contains(&pb::DownloadState::Downloading));
    assert!(states.contains(&pb::DownloadState::Verifying));
    assert_eq!(states.last(), Some(&pb::DownloadState::Completed));
    // total_bytes is known before the first byte.
    let first_downloading = messages
        .iter()
        .find(|m| m.state() == pb::DownloadState::Downloading)
        .unwrap();
    assert_eq!(first_downloading.total_bytes, files.size());
    assert_eq!(first_downloading.files_total as usize, files.0.len());
    let last = messages.last().unwrap();
    assert_eq!(
        (last.downloaded_bytes, last.total_bytes),
        (files.size(), files.size())
    );
    assert_eq!(last.files_completed, last.files_total);
    assert_eq!(last.commit_sha, C1);
    assert_eq!(last.error_code(), pb::DownloadErrorCode::None);
    assert!(last
        .files
        .iter()
        .all(|f| f.state() == pb::FileState::Completed));
    assert!(last.finished_at.is_some());

    // The cache layout huggingface_hub uses.
    let repo = repo_dir(&server, "tiny/llama");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), C1);
    for (path, bytes) in &files.0 {
        let link = repo.join("snapshots").join(C1).join(path);
        let target = std::fs::read_link(&link).unwrap();
        assert_eq!(
            target,
            Path::new("../../blobs").join(testing::etag(path, bytes)),
            "{path}"
        );
        assert_eq!(&std::fs::read(&link).unwrap(), bytes);
    }
    assert!(!blobs(&server, "tiny/llama")
        .iter()
        .any(|b| b.contains(".lmxpart")));
    assert_eq!(hub.total_bytes_sent(), files.size());

    // Listed as available; a second pull transfers nothing.
    let models = admin
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].state(), pb::ModelState::Available);
    assert_eq!(models[0].refs, ["main"]);
    assert_eq!(models[0].size_on_disk_bytes, files.size());
    let (messages, _) = download(&mut admin, request("tiny/llama")).await;
    assert!(messages
        .last()
        .unwrap()
        .files
        .iter()
        .all(|f| f.state() == pb::FileState::Cached));
    assert_eq!(hub.total_bytes_sent(), files.size());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn hub_errors_become_stable_codes() {
    let (hub, server, mut admin) = setup(|_| {}).await;
    hub.add_repo("org/gated", C1, &["main"], &testing::tiny_repo("llama", 1));
    hub.set_gated("org/gated", "hf_right");
    let cases = [
        (
            request("org/missing"),
            pb::DownloadErrorCode::RepoNotFound,
            Code::NotFound,
        ),
        (
            pb::DownloadModelRequest {
                revision: "v9".into(),
                ..request("tiny/llama")
            },
            pb::DownloadErrorCode::RevisionNotFound,
            Code::NotFound,
        ),
        (
            pb::DownloadModelRequest {
                allow_patterns: vec!["*.gguf".into()],
                ..request("tiny/llama")
            },
            pb::DownloadErrorCode::FileNotFound,
            Code::NotFound,
        ),
        (
            request("org/gated"),
            pb::DownloadErrorCode::AccessDenied,
            Code::PermissionDenied,
        ),
    ];
    for (req, code, grpc) in cases {
        let (messages, status) = download(&mut admin, req).await;
        assert_failed(&messages, status, code, grpc);
    }
    // A file the listing names but the hub then refuses to serve.
    hub.inject(Fault::Status {
        path: Some(WEIGHTS.into()),
        status: 404,
        times: 1,
    });
    let (messages, status) = download(&mut admin, request("tiny/llama")).await;
    assert_failed(
        &messages,
        status,
        pb::DownloadErrorCode::FileNotFound,
        Code::NotFound,
    );
    assert!(
        !repo_dir(&server, "tiny/llama").join("refs/main").exists(),
        "no ref for a failed download"
    );
    // A hub that keeps failing: HUB_UNAVAILABLE after the retries.
    hub.inject(Fault::Status {
        path: None,
        status: 503,
        times: 100,
    });
    let (messages, status) = download(&mut admin, request("tiny/llama")).await;
    assert_failed(
        &messages,
        status,
        pb::DownloadErrorCode::HubUnavailable,
        Code::Unavailable,
    );
    assert!(messages.last().unwrap().error_message.contains("503"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn gated_repositories_download_with_the_configured_token() {
    let hub = HubServer::start().await;
    hub.add_repo("org/gated", C1, &["main"], &testing::tiny_repo("llama", 1));
    hub.set_gated("org/gated", "hf_right");
    let url = hub.url();
    let server = TestServer::start_with(|c| {
        c.downloads.hub_endpoint = url;
        c.downloads.hf_token = Some(lmx::secret::Secret::new("hf_right"));
        c.downloads.task.disk_margin = 0;
    })
    .await;
    let mut admin = Admin::new(server.channel().await);
    let (messages, status) = download(&mut admin, request("org/gated")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        messages.last().unwrap().state(),
        pb::DownloadState::Completed
    );
    assert!(hub.requests().iter().all(|r| r.authorized));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn invalid_names_are_refused_before_any_io() {
    let (hub, server, mut admin) = setup(|_| {}).await;
    for (req, field) in [
        (request("../etc"), "model_id"),
        (
            pb::DownloadModelRequest {
                revision: "../../x".into(),
                ..request("tiny/llama")
            },
            "revision",
        ),
        (
            pb::DownloadModelRequest {
                allow_patterns: vec!["[".into()],
                ..request("tiny/llama")
            },
            "allow_patterns",
        ),
    ] {
        let (_, status) = download(&mut admin, req).await;
        let status = status.unwrap();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.get_details_bad_request().unwrap().field_violations[0].field,
            field
        );
    }
    assert!(hub.requests().is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn transient_503s_are_retried() {
    let (hub, server, mut admin) = setup(|_| {}).await;
    hub.inject(Fault::Status {
        path: None,
        status: 503,
        times: 2,
    });
    let (messages, status) = download(&mut admin, request("tiny/llama")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        messages.last().unwrap().state(),
        pb::DownloadState::Completed
    );
    assert_eq!(hub.requests().iter().filter(|r| r.status == 503).count(), 2);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_connection_reset_mid_file_resumes_with_a_range() {
    let (hub, server, mut admin) = setup(|_| {}).await;
    hub.inject(Fault::ResetAfter {
        path: WEIGHTS.into(),
        bytes: 100_000,
        times: 1,
    });
    let (messages, status) = download(&mut admin, request("tiny/llama")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        messages.last().unwrap().state(),
        pb::DownloadState::Completed
    );
    // The whole file crossed the wire exactly once: the retry asked for the rest only.
    assert_eq!(hub.bytes_sent("tiny/llama", WEIGHTS), weights_size());
    let ranges: Vec<Option<String>> = hub
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with(WEIGHTS))
        .map(|r| r.range)
        .collect();
    assert_eq!(ranges.len(), 2);
    assert!(
        ranges[1].as_deref().unwrap().starts_with("bytes=100000-"),
        "{ranges:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_truncated_body_is_resumed_or_reported_never_completed_short() {
    let (hub, server, mut admin) = setup(|_| {}).await;
    hub.inject(Fault::Truncate {
        path: WEIGHTS.into(),
        bytes: 50_000,
        times: 1,
    });
    let (messages, status) = download(&mut admin, request("tiny/llama")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        messages.last().unwrap().state(),
        pb::DownloadState::Completed
    );

    // A hub that always cuts the file short: INCOMPLETE_DOWNLOAD, and nothing visible.
    hub.add_repo("tiny/short", C1, &["main"], &testing::tiny_repo("llama", 1));
    hub.inject(Fault::Truncate {
        path: WEIGHTS.into(),
        bytes: 50_000,
        times: 100,
    });
    let (messages, status) = download(&mut admin, request("tiny/short")).await;
    assert_failed(
        &messages,
        status,
        pb::DownloadErrorCode::IncompleteDownload,
        Code::DataLoss,
    );
    let snapshot = repo_dir(&server, "tiny/short").join("snapshots").join(C1);
    assert!(!snapshot.join(WEIGHTS).exists(), "no link to a short file");
    assert!(
        !blobs(&server, "tiny/short").contains(&weights_etag()),
        "no short blob"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn wrong_bytes_of_the_right_size_are_a_checksum_mismatch_and_deleted() {
    let (hub, server, mut admin) = setup(|_| {}).await;
    hub.inject(Fault::WrongBytes {
        path: WEIGHTS.into(),
        times: 1,
    });
    let (messages, status) = download(&mut admin, request("tiny/llama")).await;
    assert_failed(
        &messages,
        status,
        pb::DownloadErrorCode::ChecksumMismatch,
        Code::DataLoss,
    );
    assert!(messages.last().unwrap().error_message.contains("sha256"));
    let left = blobs(&server, "tiny/llama");
    assert!(
        !left.iter().any(|b| b.starts_with(&weights_etag())),
        "bad blob removed: {left:?}"
    );
    assert!(!repo_dir(&server, "tiny/llama")
        .join("snapshots")
        .join(C1)
        .join(WEIGHTS)
        .exists());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_stalled_transfer_restarts_and_completes() {
    let (hub, server, mut admin) = setup(|_| {}).await;
    hub.inject(Fault::Stall {
        path: WEIGHTS.into(),
        after: 60_000,
        times: 1,
    });
    let (messages, status) = download(&mut admin, request("tiny/llama")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        messages.last().unwrap().state(),
        pb::DownloadState::Completed
    );
    assert_eq!(
        hub.bytes_sent("tiny/llama", WEIGHTS),
        weights_size(),
        "resumed, not restarted"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn cancel_mid_file_keeps_partial_data_and_the_next_pull_resumes() {
    let (hub, server, mut admin) = setup(|_| {}).await;
    hub.inject(Fault::Hold {
        path: WEIGHTS.into(),
        after: 120_000,
        times: 1,
    });
    let mut stream = admin
        .download_model(request("tiny/llama"))
        .await
        .unwrap()
        .into_inner();
    let id = stream
        .next()
        .await
        .unwrap()
        .unwrap()
        .progress
        .unwrap()
        .download_id;
    hub.wait_held(WEIGHTS).await;
    // Until lmx has written what the hub sent before holding.
    loop {
        let got = admin
            .get_download(pb::GetDownloadRequest {
                download_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .progress
            .unwrap();
        if got
            .files
            .iter()
            .any(|f| f.path == WEIGHTS && f.downloaded_bytes >= 120_000)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // While it runs: listed as DOWNLOADING, and not deletable.
    let models = admin
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models[0].state(), pb::ModelState::Downloading, "{models:?}");
    let err = admin
        .delete_model(pb::DeleteModelRequest {
            model_id: "tiny/llama".into(),
            revision: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "MODEL_DOWNLOADING"
    );

    let started = std::time::Instant::now();
    let cancelled = admin
        .cancel_download(pb::CancelDownloadRequest {
            download_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "cancel took {:?}",
        started.elapsed()
    );
    assert_eq!(cancelled.state(), pb::DownloadState::Cancelled);
    assert_eq!(
        cancelled.error_code(),
        pb::DownloadErrorCode::DownloadCancelled
    );
    // The stream ends with the terminal message and CANCELLED.
    let mut last = None;
    let mut end = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(m) => last = m.progress,
            Err(s) => end = Some(s),
        }
    }
    assert_eq!(last.unwrap().state(), pb::DownloadState::Cancelled);
    assert_eq!(end.unwrap().code(), Code::Cancelled);
    // Partial data kept, invisible as a snapshot file.
    let partial = blobs(&server, "tiny/llama");
    assert!(
        partial.contains(&format!("{}.lmxpart", weights_etag())),
        "{partial:?}"
    );
    assert!(!repo_dir(&server, "tiny/llama")
        .join("snapshots")
        .join(C1)
        .join(WEIGHTS)
        .exists());
    hub.release();

    let before = hub.bytes_sent("tiny/llama", WEIGHTS);
    let (messages, status) = download(&mut admin, request("tiny/llama")).await;
    assert!(status.is_none(), "{status:?}");
    let last = messages.last().unwrap();
    assert_eq!(last.state(), pb::DownloadState::Completed);
    assert!(
        last.resumed_bytes >= 120_000,
        "resumed {}",
        last.resumed_bytes
    );
    let second = hub.bytes_sent("tiny/llama", WEIGHTS) - before;
    assert!(
        second <= weights_size() - 120_000,
        "second pull fetched {second} of {} bytes",
        weights_size()
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_pulls_share_one_task_and_watchers_reattach() {
    let (hub, server, admin) = setup(|_| {}).await;
    hub.inject(Fault::Hold {
        path: WEIGHTS.into(),
        after: 10_000,
        times: 1,
    });
    let (mut a, mut b, mut w) = (admin.clone(), admin.clone(), admin.clone());
    let first = tokio::spawn(async move { download(&mut a, request("tiny/llama")).await });
    hub.wait_held(WEIGHTS).await;
    let second = tokio::spawn(async move { download(&mut b, request("tiny/llama")).await });
    let listed = w
        .list_downloads(pb::ListDownloadsRequest {})
        .await
        .unwrap()
        .into_inner()
        .downloads;
    assert_eq!(listed.len(), 1);
    let id = listed[0].download_id.clone();
    let mut watch = w
        .watch_download(pb::WatchDownloadRequest {
            download_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // A watcher that leaves cancels nothing.
    drop(
        w.clone()
            .watch_download(pb::WatchDownloadRequest {
                download_id: id.clone(),
            })
            .await
            .unwrap(),
    );
    hub.release();
    let (m1, s1) = first.await.unwrap();
    let (m2, s2) = second.await.unwrap();
    assert!(s1.is_none() && s2.is_none());
    assert_eq!(
        m1.last().unwrap().download_id,
        m2.last().unwrap().download_id,
        "one task"
    );
    assert_eq!(m2.last().unwrap().state(), pb::DownloadState::Completed);
    let mut watched = None;
    while let Some(item) = watch.next().await {
        watched = item.unwrap().progress;
    }
    assert_eq!(watched.unwrap().state(), pb::DownloadState::Completed);
    assert_eq!(
        hub.bytes_sent("tiny/llama", WEIGHTS),
        weights_size(),
        "downloaded once"
    );
    let got = w
        .get_download(pb::GetDownloadRequest { download_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.progress.unwrap().state(), pb::DownloadState::Completed);
    let err = w
        .watch_download(pb::WatchDownloadRequest {
            download_id: "dl-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "DOWNLOAD_NOT_FOUND"
    );
    server.stop().await.unwrap();
}

/// A request for a running (repo, revision) with other patterns or auto_load is refused with
/// FAILED_PRECONDITION naming the running download; an identical one (patterns in another
/// order) still joins it.
#[tokio::test]
async fn a_join_with_other_options_is_refused_naming_the_running_download() {
    let (hub, server, admin) = setup(|_| {}).await;
    hub.inject(Fault::Hold {
        path: WEIGHTS.into(),
        after: 10_000,
        times: 1,
    });
    let asked = |allow: &[&str], auto_load: bool| pb::DownloadModelRequest {
        model_id: "tiny/llama".into(),
        allow_patterns: allow.iter().map(|p| p.to_string()).collect(),
        auto_load,
        ..Default::default()
    };
    let mut a = admin.clone();
    let first =
        tokio::spawn(
            async move { download(&mut a, asked(&["*.json", "*.safetensors"], false)).await },
        );
    hub.wait_held(WEIGHTS).await;
    let mut w = admin.clone();
    let id = w
        .list_downloads(pb::ListDownloadsRequest {})
        .await
        .unwrap()
        .into_inner()
        .downloads[0]
        .download_id
        .clone();

    for (other, what) in [
        (asked(&["*.json"], false), "allow_patterns"),
        (asked(&["*.json", "*.safetensors"], true), "auto_load"),
    ] {
        let (messages, status) = download(&mut w, other).await;
        assert!(messages.is_empty());
        let status = status.expect("refused");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            "DOWNLOAD_CONFLICT"
        );
        assert!(status.message().contains(&id), "{}", status.message());
        assert!(status.message().contains(what), "{}", status.message());
    }
    // The call returns once the server joined the task, before the hub lets the file go.
    let mut same = w
        .download_model(asked(&["*.safetensors", "*.json"], false))
        .await
        .expect("an identical request joins")
        .into_inner();
    hub.release();
    let (m1, s1) = first.await.unwrap();
    assert!(s1.is_none(), "{s1:?}");
    assert_eq!(m1.last().unwrap().state(), pb::DownloadState::Completed);
    let mut last = None;
    while let Some(item) = same.next().await {
        last = item.unwrap().progress;
    }
    let last = last.unwrap();
    assert_eq!(last.download_id, id, "joined");
    assert_eq!(last.state(), pb::DownloadState::Completed);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn large_files_arrive_in_parallel_ranged_parts() {
    let (hub, server, mut admin) = setup(|c| {
        c.downloads.task.transfer.part_size = 64 * 1024;
        c.downloads.task.transfer.parts_in_parallel = 3;
    })
    .await;
    let (messages, status) = download(&mut admin, request("tiny/llama")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        messages.last().unwrap().state(),
        pb::DownloadState::Completed
    );
    let parts = hub
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with(WEIGHTS))
        .count() as u64;
    assert_eq!(parts, weights_size().div_ceil(64 * 1024));
    assert_eq!(hub.bytes_sent("tiny/llama", WEIGHTS), weights_size());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn too_little_free_space_fails_before_the_first_byte() {
    let (hub, server, mut admin) = setup(|c| c.downloads.task.disk_margin = u64::MAX / 4).await;
    let (messages, status) = download(&mut admin, request("tiny/llama")).await;
    assert_failed(
        &messages,
        status,
        pb::DownloadErrorCode::InsufficientDiskSpace,
        Code::ResourceExhausted,
    );
    assert_eq!(hub.total_bytes_sent(), 0);
    server.stop().await.unwrap();
}

/// A tmpfs mounted for one test (needs root); unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_disk_that_fills_mid_transfer_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_mount) = Tmpfs::mount(dir.path(), "2m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let cache = dir.path().join("hub");
    let (hub, server, mut admin) = setup(|c| c.cache_dir = cache.clone()).await;
    hub.inject(Fault::Hold {
        path: WEIGHTS.into(),
        after: 64_000,
        times: 1,
    });
    let pull = tokio::spawn(async move { download(&mut admin, request("tiny/llama")).await });
    hub.wait_held(WEIGHTS).await;
    // Fill the disk while the transfer waits.
    let filler = dir.path().join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![7u8; 64 * 1024];
    while std::io::Write::write_all(&mut f, &block).is_ok() {}
    drop(f);
    hub.release();
    let (messages, status) = pull.await.unwrap();
    assert_failed(
        &messages,
        status,
        pb::DownloadErrorCode::InsufficientDiskSpace,
        Code::ResourceExhausted,
    );
    // Nothing a user could load: no blob, no link, no ref.
    let repo = cache.join("models--tiny--llama");
    assert!(!repo.join("blobs").join(weights_etag()).exists());
    assert!(!repo.join("snapshots").join(C1).join(WEIGHTS).exists());
    assert!(!repo.join("refs/main").exists());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn auto_load_loads_a_complete_snapshot_and_skips_an_incomplete_one() {
    let (hub, server, mut admin) = setup(|_| {}).await;
    let (messages, status) = download(
        &mut admin,
        pb::DownloadModelRequest {
            auto_load: true,
            ..request("tiny/llama")
        },
    )
    .await;
    assert!(status.is_none(), "{status:?}");
    let last = messages.last().unwrap();
    assert_eq!(last.state(), pb::DownloadState::Completed);
    assert_eq!(last.auto_load_state(), pb::AutoLoadState::Loaded);
    assert!(messages
        .iter()
        .any(|m| m.auto_load_state() == pb::AutoLoadState::Pending));
    let loaded = admin
        .list_models(pb::ListModelsRequest { loaded_only: true })
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(loaded[0].state(), pb::ModelState::Loaded);

    // Incomplete on purpose: the tokenizer is left out by the patterns.
    hub.add_repo("tiny/other", C2, &["main"], &testing::tiny_repo("llama", 2));
    let (messages, status) = download(
        &mut admin,
        pb::DownloadModelRequest {
            auto_load: true,
            ignore_patterns: vec!["tokenizer.json".into()],
            ..request("tiny/other")
        },
    )
    .await;
    assert!(status.is_none(), "{status:?}");
    let last = messages.last().unwrap();
    assert_eq!(last.state(), pb::DownloadState::Completed);
    assert_eq!(
        last.auto_load_state(),
        pb::AutoLoadState::SkippedSnapshotIncomplete
    );
    assert!(
        last.auto_load_message.contains("MISSING_TOKENIZER"),
        "{}",
        last.auto_load_message
    );
    assert!(last
        .problems
        .iter()
        .any(|p| p.kind() == pb::SnapshotProblemKind::MissingTokenizer));
    let models = admin
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    let other = models.iter().find(|m| m.model_id == "tiny/other").unwrap();
    assert_eq!(other.state(), pb::ModelState::Incomplete);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn delete_is_refused_while_loaded_and_frees_the_cache_after() {
    let (hub, server, mut admin) = setup(|_| {}).await;
    let files = testing::tiny_repo("llama", 1);
    let _ = hub;
    let (_, status) = download(
        &mut admin,
        pb::DownloadModelRequest {
            auto_load: true,
            ..request("tiny/llama")
        },
    )
    .await;
    assert!(status.is_none());
    let delete = pb::DeleteModelRequest {
        model_id: "tiny/llama".into(),
        revision: String::new(),
    };
    let err = admin.delete_model(delete.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.get_details_error_info().unwrap().reason, "MODEL_LOADED");
    admin
        .unload_model(pb::UnloadModelRequest {
            model_id: "tiny/llama".into(),
            revision: String::new(),
        })
        .await
        .unwrap();
    let deleted = admin.delete_model(delete).await.unwrap().into_inner();
    assert_eq!(deleted.deleted_commits, [C1]);
    assert_eq!(deleted.freed_bytes, files.size());
    assert!(!repo_dir(&server, "tiny/llama").exists());
    assert!(admin
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models
        .is_empty());
    server.stop().await.unwrap();
}
