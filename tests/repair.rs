//! RepairModel over gRPC on the real server and the hub-protocol test server: a snapshot with a
//! corrupt blob (same size), a truncated one and a deleted one gets exactly those files fetched
//! again and then verifies clean and loads; a DownloadModel re-run replaces a blob whose content
//! does not match its name; a clean snapshot repairs offline with nothing to do; bad names get
//! the right codes.

mod common;

use std::path::Path;

use common::{hub::HubServer, TestServer};
use lmx::{pb, testing};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const C1: &str = "1111111111111111111111111111111111111111";
const REPO: &str = "tiny/llama";

type Admin = pb::model_admin_client::ModelAdminClient<Channel>;

async fn server_for(hub_url: String) -> TestServer {
    TestServer::start_with(|c| {
        c.downloads.hub_endpoint = hub_url;
        c.downloads.task.disk_margin = 0;
        c.downloads.retry.attempts = 1;
        c.downloads.retry.min_delay = std::time::Duration::from_millis(5);
    })
    .await
}

/// Every message of a progress stream, and the status it ended with.
async fn collect<T>(
    stream: tonic::Streaming<T>,
    progress: fn(T) -> Option<pb::DownloadProgress>,
) -> (Vec<pb::DownloadProgress>, Result<(), tonic::Status>) {
    let mut stream = stream;
    let mut all = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(m) => all.push(progress(m).expect("progress set")),
            Err(status) => return (all, Err(status)),
        }
    }
    (all, Ok(()))
}

async fn pull(admin: &mut Admin) -> pb::DownloadProgress {
    let stream = admin
        .download_model(pb::DownloadModelRequest {
            model_id: REPO.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (all, end) = collect(stream, |m| m.progress).await;
    end.unwrap();
    all.into_iter().last().unwrap()
}

async fn repair(
    admin: &mut Admin,
    model_id: &str,
) -> (pb::DownloadProgress, Result<(), tonic::Status>) {
    let stream = admin
        .repair_model(pb::RepairModelRequest {
            model_id: model_id.into(),
            revision: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (all, end) = collect(stream, |m| m.progress).await;
    (all.into_iter().last().expect("a terminal message"), end)
}

async fn verify_full(admin: &mut Admin) -> pb::VerifyModelResponse {
    admin
        .verify_model(pb::VerifyModelRequest {
            model_id: REPO.into(),
            revision: String::new(),
            mode: pb::VerifyMode::Full as i32,
        })
        .await
        .unwrap()
        .into_inner()
}

fn snapshot(cache: &Path) -> std::path::PathBuf {
    cache.join("models--tiny--llama/snapshots").join(C1)
}

/// Flips bytes near the end of `path`'s blob, keeping its size.
fn corrupt(snapshot: &Path, path: &str) {
    let blob = testing::blob_of(snapshot, path);
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 16..] {
        *b ^= 0xA5;
    }
    std::fs::write(&blob, bytes).unwrap();
}

#[tokio::test]
async fn repair_fetches_exactly_the_broken_files_then_the_snapshot_verifies_and_loads() {
    let hub = HubServer::start().await;
    let files = testing::tiny_repo("llama", 1);
    hub.add_repo(REPO, C1, &["main"], &files);
    let server = server_for(hub.url()).await;
    let mut admin = Admin::new(server.channel().await);
    assert_eq!(pull(&mut admin).await.state(), pb::DownloadState::Completed);
    let snap = snapshot(&server.cache_dir());

    // A blob with flipped bytes (same size), a truncated one, a deleted one.
    corrupt(&snap, "model.safetensors");
    let tokenizer = testing::blob_of(&snap, "tokenizer.json");
    let len = std::fs::metadata(&tokenizer).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tokenizer)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    std::fs::remove_file(testing::blob_of(&snap, "config.json")).unwrap();
    let before = verify_full(&mut admin).await;
    assert!(!before.complete);

    let sent = |path: &str| hub.bytes_sent(REPO, path);
    let sent_before: Vec<u64> = files.0.keys().map(|p| sent(p)).collect();
    let (last, end) = repair(&mut admin, REPO).await;
    end.unwrap();
    assert_eq!(
        last.state(),
        pb::DownloadState::Completed,
        "{}",
        last.error_message
    );
    assert!(last.repair);
    assert_eq!(
        last.repaired_files,
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    assert!(
        last.summary.contains("repaired 3 file(s)"),
        "{}",
        last.summary
    );
    assert!(
        last.summary
            .contains("model.safetensors (CHECKSUM_MISMATCH)"),
        "{}",
        last.summary
    );
    assert_eq!(last.commit_sha, C1);
    // Exactly the broken files went over the wire again, each once and whole.
    for ((path, bytes), before) in files.0.iter().zip(sent_before) {
        let again = sent(path) - before;
        if last.repaired_files.contains(path) {
            assert_eq!(again, bytes.len() as u64, "{path}");
        } else {
            assert_eq!(again, 0, "{path} was fetched again");
        }
    }
    // The snapshot is whole: FULL verify, and it loads and generates.
    let after = verify_full(&mut admin).await;
    assert!(after.complete, "{:?}", after.problems);
    for (path, bytes) in &files.0 {
        assert_eq!(&std::fs::read(snap.join(path)).unwrap(), bytes, "{path}");
    }
    common::load_model(&mut admin, REPO, None).await.unwrap();
    let mut inference = pb::inference_client::InferenceClient::new(server.channel().await);
    common::greedy_text(&mut inference, REPO).await.unwrap();

    // The repair is a download like any other: listed, with its summary.
    let listed = admin
        .list_downloads(pb::ListDownloadsRequest {})
        .await
        .unwrap()
        .into_inner()
        .downloads;
    assert!(listed
        .iter()
        .any(|d| d.repair && d.download_id == last.download_id));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_download_rerun_replaces_a_blob_whose_content_does_not_match_its_name() {
    let hub = HubServer::start().await;
    let files = testing::tiny_repo("llama", 2);
    hub.add_repo(REPO, C1, &["main"], &files);
    let server = server_for(hub.url()).await;
    let mut admin = Admin::new(server.channel().await);
    pull(&mut admin).await;
    let snap = snapshot(&server.cache_dir());
    corrupt(&snap, "model.safetensors");
    let before = hub.bytes_sent(REPO, "model.safetensors");

    let last = pull(&mut admin).await;
    assert_eq!(
        last.state(),
        pb::DownloadState::Completed,
        "{}",
        last.error_message
    );
    let weights = last
        .files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .unwrap();
    assert_eq!(
        weights.state(),
        pb::FileState::Completed,
        "not trusted on its size"
    );
    let config = last.files.iter().find(|f| f.path == "config.json").unwrap();
    assert_eq!(config.state(), pb::FileState::Cached, "intact blobs stay");
    assert_eq!(
        hub.bytes_sent(REPO, "model.safetensors") - before,
        files.0["model.safetensors"].len() as u64
    );
    assert!(verify_full(&mut admin).await.complete);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_clean_snapshot_repairs_offline_with_nothing_to_do() {
    // A hub address where nothing listens.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let server = server_for(url).await;
    testing::write_hf_cache(
        &server.cache_dir(),
        REPO,
        C1,
        Some("main"),
        &testing::tiny_repo("llama", 3),
    );
    let mut admin = Admin::new(server.channel().await);
    let (last, end) = repair(&mut admin, REPO).await;
    end.unwrap();
    assert_eq!(
        last.state(),
        pb::DownloadState::Completed,
        "{}",
        last.error_message
    );
    assert!(last.repaired_files.is_empty());
    assert!(
        last.summary.starts_with("nothing to repair"),
        "{}",
        last.summary
    );
    assert_eq!(last.commit_sha, C1);

    // A broken one needs the hub: with the hub down, the repair fails HUB_UNAVAILABLE and says so.
    corrupt(&snapshot(&server.cache_dir()), "model.safetensors");
    let (last, end) = repair(&mut admin, REPO).await;
    assert_eq!(last.state(), pb::DownloadState::Failed);
    assert_eq!(last.error_code(), pb::DownloadErrorCode::HubUnavailable);
    assert!(!last.problems.is_empty(), "the problems found are reported");
    assert_eq!(end.unwrap_err().code(), tonic::Code::Unavailable);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn repair_of_an_unknown_model_or_a_folder_is_refused_with_the_right_code() {
    let server = server_for("http://127.0.0.1:9".into()).await;
    let mut admin = Admin::new(server.channel().await);
    for (model_id, code, named) in [
        ("tiny/absent", tonic::Code::NotFound, "tiny/absent"),
        ("/tmp/some-folder", tonic::Code::InvalidArgument, "model_id"),
        ("bad//id", tonic::Code::InvalidArgument, "model_id"),
    ] {
        let status = admin
            .repair_model(pb::RepairModelRequest {
                model_id: model_id.into(),
                revision: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{model_id}: {status:?}");
        assert!(
            status.message().contains(named),
            "{model_id}: {}",
            status.message()
        );
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_cancelled_repair_resumes_where_it_stopped() {
    let hub = HubServer::start().await;
    let files = testing::tiny_repo("llama", 5);
    hub.add_repo(REPO, C1, &["main"], &files);
    let server = server_for(hub.url()).await;
    let mut admin = Admin::new(server.channel().await);
    pull(&mut admin).await;
    let snap = snapshot(&server.cache_dir());
    let weights = "model.safetensors";
    let size = files.0[weights].len() as u64;
    std::fs::remove_file(testing::blob_of(&snap, weights)).unwrap();

    // The first repair stops after 150 kB: cancelled.
    hub.inject(common::hub::Fault::Hold {
        path: weights.into(),
        after: 150_000,
        times: 1,
    });
    let mut stream = admin
        .repair_model(pb::RepairModelRequest {
            model_id: REPO.into(),
            revision: String::new(),
        })
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
    hub.wait_held(weights).await;
    // Until lmx has the held bytes on disk (progress is published every 250 ms).
    while let Some(item) = stream.next().await {
        if item.unwrap().progress.unwrap().downloaded_bytes >= 150_000 {
            break;
        }
    }
    let cancelled = admin
        .cancel_download(pb::CancelDownloadRequest { download_id: id })
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap();
    assert_eq!(cancelled.state(), pb::DownloadState::Cancelled);
    hub.release();
    drop(stream);

    // The second one resumes: only the rest crosses the wire, and the result verifies.
    let before = hub.bytes_sent(REPO, weights);
    let (last, end) = repair(&mut admin, REPO).await;
    end.unwrap();
    assert_eq!(
        last.state(),
        pb::DownloadState::Completed,
        "{}",
        last.error_message
    );
    assert_eq!(last.repaired_files, [weights]);
    assert!(
        last.resumed_bytes >= 150_000,
        "resumed {}",
        last.resumed_bytes
    );
    assert_eq!(
        hub.bytes_sent(REPO, weights) - before,
        size - last.resumed_bytes
    );
    assert!(verify_full(&mut admin).await.complete);
    server.stop().await.unwrap();
}
