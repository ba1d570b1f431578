//! What a remote client can reach, tested as an attacker would try it: an admin naming folders
//! outside the model roots, a hub sending hostile templates or listings, an inference client
//! sending more than the limits allow. Each test shows the code the client gets and what the
//! server did (or did not) do.

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

type Admin = pb::model_admin_client::ModelAdminClient<Channel>;
type Inference = pb::inference_client::InferenceClient<Channel>;

const C1: &str = "1111111111111111111111111111111111111111";

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

async fn verify(
    admin: &mut Admin,
    model_id: &str,
) -> Result<pb::VerifyModelResponse, tonic::Status> {
    admin
        .verify_model(pb::VerifyModelRequest {
            model_id: model_id.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn load(admin: &mut Admin, model_id: &str) -> Result<pb::LoadModelResponse, tonic::Status> {
    admin
        .load_model(pb::LoadModelRequest {
            model_id: model_id.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn admins_cannot_verify_or_load_folders_outside_the_model_roots() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    testing::tiny::write_model(&root.path().join("m"), "llama", 1);
    testing::tiny::write_model(&outside.path().join("m"), "llama", 1);
    std::os::unix::fs::symlink(outside.path().join("m"), root.path().join("escape")).unwrap();
    let roots = vec![root.path().to_path_buf()];
    let server = TestServer::start_with(|c| c.model_roots = roots).await;
    let mut admin = Admin::new(server.channel().await);

    let outside_m = path(&outside.path().join("m"));
    let escape = path(&root.path().join("escape"));
    let dotdot = format!("{}/../etc", path(root.path()));
    for model_id in ["/etc", "/", "/no/such/folder", &outside_m, &escape, &dotdot] {
        let status = verify(&mut admin, model_id).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{model_id}: {status:?}"
        );
        assert_eq!(reason(&status), "INVALID_ARGUMENT");
        if model_id != dotdot {
            assert!(
                status.message().contains("--model-root")
                    && status.message().contains(&path(root.path()))
                    && status.message().contains(&path(&server.cache_dir())),
                "names the roots: {}",
                status.message()
            );
        }
        assert!(!status.message().contains("passwd"), "{}", status.message());
        let status = load(&mut admin, model_id).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{model_id}: {status:?}"
        );
    }

    // Inside the root: verified and loaded as before.
    let inside = path(&root.path().join("m"));
    assert!(verify(&mut admin, &inside).await.unwrap().complete);
    load(&mut admin, &inside).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn without_model_roots_only_the_cache_is_reachable() {
    let folder = tempfile::tempdir().unwrap();
    testing::tiny::write_model(folder.path(), "llama", 1);
    let server = TestServer::start_with(|c| c.model_roots.clear()).await;
    let mut admin = Admin::new(server.channel().await);
    let status = verify(&mut admin, &path(folder.path())).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("none configured"),
        "{}",
        status.message()
    );
    // A folder inside the cache is allowed.
    let in_cache = server.cache_dir().join("plain-folder");
    testing::tiny::write_model(&in_cache, "llama", 1);
    assert!(verify(&mut admin, &path(&in_cache)).await.unwrap().complete);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_binary_refuses_load_folders_outside_the_roots_and_missing_roots_at_start() {
    let cache = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lmx"))
            .args(["serve", "--listen", "127.0.0.1:0", "--cache-dir"])
            .arg(cache.path())
            .args(args)
            .env_remove("LMX_MODEL_ROOTS")
            .output()
            .unwrap()
    };
    let out = run(&["--load", "/etc"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--load /etc") && stderr.contains("--model-root"),
        "{stderr}"
    );

    let out = run(&["--model-root", "/no/such/root"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("/no/such/root"), "{stderr}");
}

#[tokio::test]
async fn the_offline_verify_command_still_checks_any_folder() {
    let folder = tempfile::tempdir().unwrap();
    testing::tiny::write_model(folder.path(), "llama", 1);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lmx"))
        .args(["verify"])
        .arg(folder.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tiny llama whose tokenizer_config.json carries `template`.
fn model_with_template(dir: &Path, template: &str) {
    testing::tiny::write_model(dir, "llama", 1);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec(&serde_json::json!({
            "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template
        }))
        .unwrap(),
    )
    .unwrap();
}

#[tokio::test]
async fn a_hostile_chat_template_fails_load_model_not_the_first_user() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start().await;
    let mut admin = Admin::new(server.channel().await);
    for (i, template) in [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% set s = 'x' * 100000000 %}{{ s }}{{ s }}",
    ]
    .iter()
    .enumerate()
    {
        let model = dir.path().join(format!("m{i}"));
        model_with_template(&model, template);
        let started = std::time::Instant::now();
        let status = load(&mut admin, &path(&model)).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{template}: {status:?}"
        );
        assert_eq!(reason(&status), "TEMPLATE_LIMIT", "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(30), "{template}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_template_that_explodes_on_long_conversations_fails_only_that_request() {
    let dir = tempfile::tempdir().unwrap();
    // Cubic in the conversation: the samples at load pass, 200 messages do not.
    model_with_template(
        dir.path(),
        "{% for a in messages %}{% for b in messages %}{% for c in messages %}{% endfor %}{% endfor %}{% endfor %}{{ messages[-1].content }}",
    );
    let server = TestServer::start().await;
    let mut admin = Admin::new(server.channel().await);
    let model_id = path(dir.path());
    load(&mut admin, &model_id).await.unwrap();
    let mut inference = Inference::new(server.channel().await);
    let chat = |n: usize| pb::ChatRequest {
        model_id: model_id.clone(),
        messages: (0..n)
            .map(|i| pb::ChatMessage {
                role: "user".into(),
                content: format!("m{i}"),
            })
            .collect(),
        parameters: Some(pb::GenerationParameters {
            max_tokens: Some(2),
            ..Default::default()
        }),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let status = inference.chat(chat(200)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "TEMPLATE_LIMIT");
    assert!(started.elapsed() < Duration::from_secs(30));
    // The server is free again: a short conversation streams.
    let mut stream = inference.chat(chat(1)).await.unwrap().into_inner();
    while let Some(item) = stream.next().await {
        item.unwrap();
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_binary_enforces_its_request_limits() {
    let dir = tempfile::tempdir().unwrap();
    testing::tiny::write_model(&dir.path().join("llm"), "llama", 1);
    testing::tiny::write_bert(&dir.path().join("bert"), 1);
    let root = path(dir.path());
    let common::Spawned {
        mut child, addr, ..
    } = common::spawn_serve(&[
        "--listen",
        "127.0.0.1:0",
        "--cache-dir",
        &path(&dir.path().join("cache")),
        "--model-root",
        &root,
        "--max-messages",
        "2",
        "--max-prompt-tokens",
        "8",
        "--max-embed-inputs",
        "2",
        "--max-message-size",
        "4KiB",
    ])
    .await;
    let channel = common::connect(addr).await;
    let mut admin = Admin::new(channel.clone());
    let mut inference = Inference::new(channel);
    let llm = format!("{root}/llm");
    let bert = format!("{root}/bert");
    load(&mut admin, &llm).await.unwrap();
    load(&mut admin, &bert).await.unwrap();

    let message = |content: &str| pb::ChatMessage {
        role: "user".into(),
        content: content.into(),
    };
    let status = inference
        .chat(pb::ChatRequest {
            model_id: llm.clone(),
            messages: vec![message("a"), message("b"), message("c")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("at most 2 messages. Given: 3"),
        "{status:?}"
    );

    let generate = |prompt: String| pb::GenerateRequest {
        model_id: llm.clone(),
        prompt,
        ..Default::default()
    };
    let status = inference
        .generate(generate("a b c d e f g h i j k".into()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("at most 8 tokens"), "{status:?}");

    let status = inference
        .generate(generate("x".repeat(8 << 10)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    let status = inference
        .embed(pb::EmbedRequest {
            model_id: bert.clone(),
            inputs: vec!["a".into(), "b".into(), "c".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("at most 2 strings. Given: 3"),
        "{status:?}"
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn downloads_and_progress_streams_are_bounded() {
    let hub = HubServer::start().await;
    hub.add_repo("tiny/a", C1, &["main"], &testing::tiny_repo("llama", 1));
    hub.add_repo("tiny/b", C1, &["main"], &testing::tiny_repo("llama", 2));
    let url = hub.url();
    let server = TestServer::start_with(|c| {
        c.downloads.hub_endpoint = url;
        c.downloads.task.disk_margin = 0;
        c.downloads.max_active = 1;
        c.downloads.max_watchers = 2;
    })
    .await;
    let mut admin = Admin::new(server.channel().await);
    hub.inject(Fault::Hold {
        path: "model.safetensors".into(),
        after: 1000,
        times: 1,
    });
    let request = |id: &str| pb::DownloadModelRequest {
        model_id: id.into(),
        ..Default::default()
    };
    let mut first = admin
        .download_model(request("tiny/a"))
        .await
        .unwrap()
        .into_inner();
    let id = first
        .next()
        .await
        .unwrap()
        .unwrap()
        .progress
        .unwrap()
        .download_id;
    hub.wait_held("model.safetensors").await;

    // A second download while one runs: refused, nothing started.
    let status = admin.download_model(request("tiny/b")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "TOO_MANY_DOWNLOADS");
    assert!(!server.cache_dir().join("models--tiny--b").exists());

    // Watchers: the first stream holds one place, a WatchDownload the second, a third is refused.
    let watch = pb::WatchDownloadRequest {
        download_id: id.clone(),
    };
    let second = admin
        .watch_download(watch.clone())
        .await
        .unwrap()
        .into_inner();
    let status = admin.watch_download(watch.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "TOO_MANY_WATCHERS");
    // Joining the running download is a watcher too.
    let status = admin.download_model(request("tiny/a")).await.unwrap_err();
    assert_eq!(reason(&status), "TOO_MANY_WATCHERS");

    // When the download ends its streams end and their places free up.
    drop(second);
    hub.release();
    while let Some(item) = first.next().await {
        item.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match admin.watch_download(watch.clone()).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(tokio::time::Instant::now() < deadline, "places never freed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    server.stop().await.unwrap();
}

/// A hub that answers every listing with `listing` and every file with a few bytes.
async fn hostile_hub(listing: serde_json::Value) -> String {
    use axum::{routing::any, Router};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = serde_json::to_vec(&listing).unwrap();
    let app = Router::new()
        .route(
            "/api/models/{*rest}",
            any(move || {
                let body = body.clone();
                async move { ([("content-type", "application/json")], body) }
            }),
        )
        .fallback(any(|| async { "hello" }));
    tokio::spawn(async move {
        let service = hyper_util::service::TowerToHyperService::new(app);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_hub_cannot_make_the_server_write_outside_its_cache() {
    let sha1 = "a".repeat(40);
    for listing in [
        serde_json::json!({"sha": "../../../escape-commit",
            "siblings": [{"rfilename": "config.json", "blobId": sha1, "size": 5}]}),
        serde_json::json!({"sha": sha1,
            "siblings": [{"rfilename": "config.json", "blobId": "../../../../escape-blob", "size": 5}]}),
        serde_json::json!({"sha": sha1,
            "siblings": [{"rfilename": "config.json", "lfs": {"sha256": "../../../../escape-lfs", "size": 5}}]}),
    ] {
        let url = hostile_hub(listing.clone()).await;
        let base = tempfile::tempdir().unwrap();
        let cache = base.path().join("a/b/hub");
        let server = TestServer::start_with(|c| {
            c.cache_dir = cache.clone();
            c.downloads.hub_endpoint = url;
            c.downloads.retry.attempts = 0;
            c.downloads.task.disk_margin = 0;
        })
        .await;
        let mut admin = Admin::new(server.channel().await);
        let mut stream = admin
            .download_model(pb::DownloadModelRequest {
                model_id: "evil/model".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut last = None;
        let mut ended = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(m) => last = m.progress,
                Err(s) => ended = Some(s),
            }
        }
        let last = last.unwrap();
        assert_eq!(
            last.state(),
            pb::DownloadState::Failed,
            "{listing}: {last:?}"
        );
        assert!(
            last.error_message.contains("hex digits"),
            "{}",
            last.error_message
        );
        assert!(ended.is_some());
        let escaped: Vec<_> = walk(base.path())
            .into_iter()
            .filter(|p| p.to_string_lossy().contains("escape"))
            .collect();
        assert!(escaped.is_empty(), "{listing}: wrote {escaped:?}");
        server.stop().await.unwrap();
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
