//! Pull throughput (a bench binary: `cargo bench --bench download`).
//!
//! A ~1 GB repository of 4 safetensors shards served on loopback by the hub-protocol test server,
//! pulled in the same run by:
//! 1. lmx (DownloadModel over gRPC, in-process server, fresh cache): hashing, verification and
//!    the snapshot check included;
//! 2. Python's huggingface_hub `snapshot_download` (LMX_BENCH_PYTHON, else .venv/bin/python);
//! 3. `curl` writing the same files to disk (4 transfers in parallel), as the plain-HTTP peer.
//!
//! Printed: seconds and MB/s of each, and the ratios lmx / huggingface_hub and lmx / curl.

#[path = "../tests/common/hub.rs"]
#[allow(dead_code)]
mod hub;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use lmx::{pb, testing};
use tokio_stream::StreamExt;

const COMMIT: &str = "4444444444444444444444444444444444444444";
const REPO: &str = "bench/four-shards";
/// f32 elements per tensor: 2 tensors per shard, 4 shards, ~1 GiB in all.
const FLOATS: usize = 32 << 20;

fn mbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64()
}

async fn lmx_pull(url: &str, cache: &Path) -> Duration {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = lmx::Config::new(cache);
    config.downloads.hub_endpoint = url.to_owned();
    config.downloads.task.disk_margin = 0;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(lmx::run(config, listener, async {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = pb::model_admin_client::ModelAdminClient::new(channel);
    let started = Instant::now();
    let mut stream = admin
        .download_model(pb::DownloadModelRequest {
            model_id: REPO.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(item) = stream.next().await {
        last = item.unwrap().progress;
    }
    let elapsed = started.elapsed();
    assert_eq!(last.unwrap().state(), pb::DownloadState::Completed);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    elapsed
}

fn hf_pull(python: &str, url: &str, cache: &Path) -> Option<Duration> {
    let script = format!(
        "import time; from huggingface_hub import snapshot_download\n\
         t = time.perf_counter(); snapshot_download({REPO:?}, cache_dir={:?}, endpoint={url:?}); print(time.perf_counter() - t)",
        cache.to_str().unwrap()
    );
    let out = std::process::Command::new(python)
        .args(["-c", &script])
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "huggingface_hub not run: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .ok()
        .map(Duration::from_secs_f64)
}

fn curl_pull(url: &str, files: &testing::RepoFiles, dir: &Path) -> Option<Duration> {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-s", "-f", "--parallel", "--parallel-max", "4"]);
    for path in files.0.keys() {
        cmd.arg("-o")
            .arg(dir.join(path))
            .arg(format!("{url}/{REPO}/resolve/{COMMIT}/{path}"));
    }
    let started = Instant::now();
    let status = cmd.status().ok()?;
    status.success().then(|| started.elapsed())
}

fn main() {
    let files = testing::sharded_safetensors_repo(4, FLOATS);
    let bytes = files.size();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let hub = runtime.block_on(hub::HubServer::start());
    hub.add_repo(REPO, COMMIT, &["main"], &files);
    let url = hub.url();
    let scratch = tempfile::tempdir().unwrap();

    let lmx = runtime.block_on(lmx_pull(&url, &scratch.path().join("lmx")));
    let python = std::env::var("LMX_BENCH_PYTHON").unwrap_or_else(|_| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(".venv/bin/python")
            .to_string_lossy()
            .into_owned()
    });
    let hf = hf_pull(&python, &url, &scratch.path().join("hf"));
    let curl_dir = scratch.path().join("curl");
    std::fs::create_dir_all(&curl_dir).unwrap();
    let curl = curl_pull(&url, &files, &curl_dir);

    println!(
        "Pull of {:.2} GB in {} files (4 shards) from the loopback hub, {} threads",
        bytes as f64 / 1e9,
        files.0.len(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "  lmx DownloadModel (verified):  {:>6.2} s  {:>7.1} MB/s",
        lmx.as_secs_f64(),
        mbps(bytes, lmx)
    );
    match hf {
        Some(t) => println!(
            "  huggingface_hub:               {:>6.2} s  {:>7.1} MB/s   lmx / huggingface_hub x{:.2}",
            t.as_secs_f64(),
            mbps(bytes, t),
            mbps(bytes, lmx) / mbps(bytes, t)
        ),
        None => println!("  huggingface_hub: not installed for {python}"),
    }
    match curl {
        Some(t) => println!(
            "  curl (4 in parallel, to disk): {:>6.2} s  {:>7.1} MB/s   lmx / curl x{:.2}",
            t.as_secs_f64(),
            mbps(bytes, t),
            mbps(bytes, lmx) / mbps(bytes, t)
        ),
        None => println!("  curl: not available"),
    }
    drop(hub);
}
