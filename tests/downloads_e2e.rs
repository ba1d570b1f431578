//! Downloads end to end: the lmx process killed with -9 mid-transfer and restarted resumes; the
//! real SmolLM2 sharded snapshot pulled through the hub loads and generates; Python's
//! huggingface_hub finds what lmx pulled, and lmx lists, verifies and loads what huggingface_hub
//! pulled.

mod common;

use std::time::Duration;

use common::{
    hub::{Fault, HubServer},
    models, repo_root, tools, TestServer,
};
use lmx::{pb, testing};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const C1: &str = "1111111111111111111111111111111111111111";
const WEIGHTS: &str = "model.safetensors";

type Admin = pb::model_admin_client::ModelAdminClient<Channel>;

async fn pull(admin: &mut Admin, model_id: &str, auto_load: bool) -> pb::DownloadProgress {
    let mut stream = admin
        .download_model(pb::DownloadModelRequest {
            model_id: model_id.into(),
            auto_load,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(item) = stream.next().await {
        last = Some(
            item.unwrap_or_else(|s| panic!("download failed: {s:?}"))
                .progress
                .unwrap(),
        );
    }
    last.unwrap()
}

/// Starts the lmx binary against `hub` with `cache`; returns it and its address.
async fn spawn_lmx(
    cache: &std::path::Path,
    hub: &str,
) -> (tokio::process::Child, std::net::SocketAddr) {
    let cache = cache.to_str().unwrap();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--hub-endpoint",
        hub,
        "--download-retry-delay",
        "10ms",
        "--disk-margin",
        "0",
        "--cache-dir",
        cache,
    ];
    let spawned = common::spawn_serve(&args).await;
    (spawned.child, spawned.addr)
}

#[tokio::test]
async fn a_kill_9_mid_transfer_resumes_after_restart() {
    let hub = HubServer::start().await;
    let files = testing::tiny_repo("llama", 1);
    hub.add_repo("tiny/llama", C1, &["main"], &files);
    let size = files.0[WEIGHTS].len() as u64;
    let sidecar = {
        let etag = testing::etag(WEIGHTS, &files.0[WEIGHTS]);
        move |cache: &std::path::Path| {
            cache
                .join("models--tiny--llama/blobs")
                .join(format!("{etag}.lmxpart.json"))
        }
    };
    hub.inject(Fault::Hold {
        path: WEIGHTS.into(),
        after: 150_000,
        times: 1,
    });
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let (mut first, addr) = spawn_lmx(&cache, &hub.url()).await;
    let mut admin = Admin::new(common::connect(addr).await);
    let mut stream = admin
        .download_model(pb::DownloadModelRequest {
            model_id: "tiny/llama".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    hub.wait_held(WEIGHTS).await;
    // Until lmx has recorded the bytes it has on disk (it does so every 250 ms).
    let recorded = loop {
        let done = std::fs::read(sidecar(&cache))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["parts"][0]["done"].as_u64())
            .unwrap_or(0);
        if done >= 150_000 {
            break done;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();
    drop(stream);
    hub.release();

    let before = hub.bytes_sent("tiny/llama", WEIGHTS);
    let (_second, addr) = spawn_lmx(&cache, &hub.url()).await;
    let mut admin = Admin::new(common::connect(addr).await);
    let last = pull(&mut admin, "tiny/llama", false).await;
    assert_eq!(
        last.state(),
        pb::DownloadState::Completed,
        "{}",
        last.error_message
    );
    assert!(
        last.resumed_bytes >= recorded,
        "resumed {} of {recorded}",
        last.resumed_bytes
    );
    assert_eq!(
        hub.bytes_sent("tiny/llama", WEIGHTS) - before,
        size - last.resumed_bytes,
        "only the rest was fetched"
    );
    // Verified by hash after the resume: the snapshot is complete, FULL mode included.
    let report = admin
        .verify_model(pb::VerifyModelRequest {
            model_id: "tiny/llama".into(),
            revision: String::new(),
            mode: pb::VerifyMode::Full as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(report.complete, "{:?}", report.problems);
}

#[tokio::test]
async fn the_real_sharded_smollm2_snapshot_pulls_auto_loads_and_generates() {
    let Some(dir) = models::smollm2_hf_sharded() else {
        return;
    };
    let files = testing::RepoFiles::from_dir(&dir);
    let hub = HubServer::start().await;
    hub.add_repo("HuggingFaceTB/SmolLM2-135M-Instruct", C1, &["main"], &files);
    let url = hub.url();
    let server = TestServer::start_with(|c| {
        c.downloads.hub_endpoint = url;
        c.downloads.task.disk_margin = 0;
    })
    .await;
    let mut admin = Admin::new(server.channel().await);
    let last = pull(&mut admin, "HuggingFaceTB/SmolLM2-135M-Instruct", true).await;
    assert_eq!(last.state(), pb::DownloadState::Completed);
    assert_eq!(
        last.auto_load_state(),
        pb::AutoLoadState::Loaded,
        "{}",
        last.auto_load_message
    );
    assert_eq!(last.files_total as usize, files.0.len());
    assert_eq!(last.downloaded_bytes, files.size());
    let mut inference = pb::inference_client::InferenceClient::new(server.channel().await);
    let mut stream = inference
        .generate(pb::GenerateRequest {
            model_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            prompt: "The capital of France is".into(),
            parameters: Some(pb::GenerationParameters {
                max_tokens: Some(3),
                temperature: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while let Some(item) = stream.next().await {
        if let Some(pb::generate_response::Item::Token(t)) = item.unwrap().item {
            text.push_str(&t.text);
        }
    }
    assert!(text.starts_with(" Paris"), "{text:?}");
    server.stop().await.unwrap();
}

async fn python(venv: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = tokio::process::Command::new(venv.join("bin/python"))
        .arg(repo_root().join("tests/interop/hf_cache.py"))
        .args(args)
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "hf_cache.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn huggingface_hub_and_lmx_share_one_cache() {
    let Some(venv) = tools::venv() else { return };
    let hub = HubServer::start().await;
    let files = testing::tiny_repo("llama", 1);
    hub.add_repo("tiny/llama", C1, &["main"], &files);
    let url = hub.url();
    let server = TestServer::start_with(|c| {
        c.downloads.hub_endpoint = url.clone();
        c.downloads.task.disk_margin = 0;
    })
    .await;
    let mut admin = Admin::new(server.channel().await);

    // What lmx pulled, huggingface_hub finds offline and scans.
    pull(&mut admin, "tiny/llama", false).await;
    let cache = server.cache_dir();
    let found = python(
        &venv,
        &["find", cache.to_str().unwrap(), "tiny/llama", "main"],
    )
    .await;
    let snapshot = cache.join("models--tiny--llama/snapshots").join(C1);
    assert_eq!(found["path"], snapshot.to_str().unwrap());
    assert_eq!(found["repos"][0]["repo_id"], "tiny/llama");
    assert_eq!(found["repos"][0]["revisions"][0], C1);
    assert_eq!(found["repos"][0]["refs"][0], "main");
    assert_eq!(found["repos"][0]["size_on_disk"], files.size());
    assert_eq!(found["warnings"].as_array().unwrap().len(), 0);

    // What huggingface_hub pulled, lmx lists, verifies and loads.
    hub.add_repo("py/pulled", C1, &["main"], &testing::tiny_repo("llama", 7));
    let pulled = python(&venv, &["pull", cache.to_str().unwrap(), "py/pulled", &url]).await;
    assert!(pulled["path"].as_str().unwrap().ends_with(C1));
    let models = admin
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    let listed = models
        .iter()
        .find(|m| m.model_id == "py/pulled")
        .expect("listed");
    assert_eq!(listed.state(), pb::ModelState::Available);
    let report = admin
        .verify_model(pb::VerifyModelRequest {
            model_id: "py/pulled".into(),
            revision: String::new(),
            mode: pb::VerifyMode::Full as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(report.complete, "{:?}", report.problems);
    assert!(report.bytes_hashed > 0);
    let loaded = admin
        .load_model(pb::LoadModelRequest {
            model_id: "py/pulled".into(),
            revision: String::new(),
            options: None,
            alias: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(loaded.model.unwrap().state(), pb::ModelState::Loaded);
    server.stop().await.unwrap();
}
