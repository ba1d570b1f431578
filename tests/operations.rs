//! Operating lmx: bearer tokens per API family, TLS and mutual TLS (certificates made in the test
//! with rcgen), Prometheus metrics after a pull and a generation, the refusal to expose the admin
//! API without a token, and the drain of a running Generate stream on SIGTERM.

mod common;

use std::time::Duration;

use common::{hub::HubServer, TestServer};
use lmx::{pb, secret::Secret, testing};
use tokio_stream::StreamExt;
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code, Request,
};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const C1: &str = "1111111111111111111111111111111111111111";

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(t) = token {
        let value: MetadataValue<_> = format!("Bearer {t}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[tokio::test]
async fn tokens_guard_each_api_family_and_leave_health_open() {
    let server = TestServer::start_with(|c| {
        c.tokens.admin = Some(Secret::new("admin-secret-1"));
        c.tokens.inference = Some(Secret::new("inference-secret-2"));
    })
    .await;
    let channel = server.channel().await;
    let mut admin = pb::model_admin_client::ModelAdminClient::new(channel.clone());
    let mut inference = pb::inference_client::InferenceClient::new(channel.clone());

    let list = |token| with_token(pb::ListModelsRequest::default(), token);
    assert_eq!(
        admin.list_models(list(None)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        admin
            .list_models(list(Some("wrong")))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        admin
            .list_models(list(Some("inference-secret-2")))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied,
        "the inference token does not open the admin API"
    );
    admin
        .list_models(list(Some("admin-secret-1")))
        .await
        .unwrap();

    let tokenize = |token| {
        with_token(
            pb::TokenizeRequest {
                model_id: "org/none".into(),
                text: "x".into(),
                ..Default::default()
            },
            token,
        )
    };
    assert_eq!(
        inference.tokenize(tokenize(None)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        inference
            .tokenize(tokenize(Some("wrong")))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    // Past the guard, the call itself answers (the model does not exist).
    assert_eq!(
        inference
            .tokenize(tokenize(Some("inference-secret-2")))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        inference
            .tokenize(tokenize(Some("admin-secret-1")))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        ServingStatus::Serving as i32,
        "health needs no token"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn tokens_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "file-admin-token-7\n").unwrap();
    let common::Spawned {
        mut child,
        addr,
        log,
    } = common::spawn_serve(&[
        "--listen",
        "127.0.0.1:0",
        "--cache-dir",
        dir.path().to_str().unwrap(),
        "--admin-token-file",
        token_file.to_str().unwrap(),
        "--inference-token",
        "flag-inference-token-8",
        "--hf-token",
        "hf-hub-token-9",
    ])
    .await;
    let channel = common::connect(addr).await;
    let mut admin = pb::model_admin_client::ModelAdminClient::new(channel);
    for token in [None, Some("wrong-token-10"), Some("file-admin-token-7")] {
        let _ = admin
            .list_models(with_token(pb::ListModelsRequest::default(), token))
            .await;
    }
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = child.wait().await.unwrap();
    let log = log.lock().unwrap().clone();
    assert!(status.success(), "{status:?}: {log}");
    assert!(
        log.contains("call refused"),
        "the refusals are logged: {log}"
    );
    for secret in [
        "file-admin-token-7",
        "flag-inference-token-8",
        "hf-hub-token-9",
        "wrong-token-10",
    ] {
        assert!(!log.contains(secret), "{secret} leaked into the log");
    }
}

#[tokio::test]
async fn an_exposed_admin_api_needs_a_token_or_an_explicit_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lmx"))
        .args(["serve", "--listen", "0.0.0.0:0", "--cache-dir"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without an admin token"),
        "{stderr}"
    );

    let common::Spawned { mut child, .. } = common::spawn_serve(&[
        "--listen",
        "0.0.0.0:0",
        "--insecure-admin",
        "--cache-dir",
        dir.path().to_str().unwrap(),
    ])
    .await;
    child.start_kill().unwrap();
}

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["client".to_owned()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();
    Pki {
        ca: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

async fn tls_channel(
    server: &TestServer,
    pki: &Pki,
    identity: bool,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    if identity {
        tls = tls.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    }
    Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

async fn health(channel: Channel) -> Result<i32, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
}

#[tokio::test]
async fn tls_and_mutual_tls_round_trips() {
    let pki = pki();
    let tls = |client_ca: bool| lmx::server::TlsFiles {
        cert: pki.server_cert.clone().into_bytes(),
        key: Secret::new(pki.server_key.clone()),
        client_ca: client_ca.then(|| pki.ca.clone().into_bytes()),
    };

    let server = TestServer::start_with(|c| c.tls = Some(tls(false))).await;
    let channel = tls_channel(&server, &pki, false).await.unwrap();
    assert_eq!(
        health(channel).await.unwrap(),
        ServingStatus::Serving as i32
    );
    // Plaintext clients get nowhere.
    let plain = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        assert!(health(plain).await.is_err());
    }
    server.stop().await.unwrap();

    let server = TestServer::start_with(|c| c.tls = Some(tls(true))).await;
    let with_cert = tls_channel(&server, &pki, true).await.unwrap();
    assert_eq!(
        health(with_cert).await.unwrap(),
        ServingStatus::Serving as i32
    );
    let without_cert = match tls_channel(&server, &pki, false).await {
        Ok(channel) => health(channel).await.is_err(),
        Err(_) => true,
    };
    assert!(
        without_cert,
        "mutual TLS refuses a client without a certificate"
    );
    server.stop().await.unwrap();
}

/// GET /metrics over a raw HTTP/1.1 connection.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: lmx\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the first sample line starting with `prefix`.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_after_a_pull_and_a_generation() {
    let hub = HubServer::start().await;
    let files = testing::tiny_repo("llama", 1);
    hub.add_repo("tiny/metrics", C1, &["main"], &files);
    let url = hub.url();
    let server = TestServer::start_with_metrics(|c| {
        c.downloads.hub_endpoint = url;
        c.downloads.task.disk_margin = 0;
    })
    .await;
    let channel = server.channel().await;
    let mut admin = pb::model_admin_client::ModelAdminClient::new(channel.clone());
    let pull = |model: &str| pb::DownloadModelRequest {
        model_id: model.into(),
        auto_load: true,
        ..Default::default()
    };
    let mut stream = admin
        .download_model(pull("tiny/metrics"))
        .await
        .unwrap()
        .into_inner();
    while stream.next().await.transpose().unwrap().is_some() {}
    let mut failed = admin
        .download_model(pull("tiny/absent"))
        .await
        .unwrap()
        .into_inner();
    while let Some(Ok(_)) = failed.next().await {}
    let mut inference = pb::inference_client::InferenceClient::new(channel);
    let mut generation = inference
        .generate(pb::GenerateRequest {
            model_id: "tiny/metrics".into(),
            prompt: "hello".into(),
            parameters: Some(pb::GenerationParameters {
                max_tokens: Some(8),
                temperature: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut tokens, mut prompt_tokens) = (0.0, 0.0);
    while let Some(item) = generation.next().await {
        match item.unwrap().item {
            Some(pb::generate_response::Item::Token(_)) => tokens += 1.0,
            Some(pb::generate_response::Item::Completion(done)) => {
                prompt_tokens = f64::from(done.prompt_tokens)
            }
            _ => {}
        }
    }
    assert!(tokens >= 1.0 && prompt_tokens >= 1.0);

    let text = scrape(server.metrics_addr.unwrap()).await;
    assert!(
        sample(
            &text,
            "lmx_rpc_requests_total{method=\"/lmx.v1.ModelAdmin/DownloadModel\",code=\"OK\"}"
        ) >= 1.0
    );
    assert!(sample(&text, "lmx_rpc_requests_total{method=\"/lmx.v1.ModelAdmin/DownloadModel\",code=\"NOT_FOUND\"}") >= 1.0);
    assert!(
        sample(
            &text,
            "lmx_rpc_requests_total{method=\"/lmx.v1.Inference/Generate\",code=\"OK\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &text,
            "lmx_rpc_duration_seconds_count{method=\"/lmx.v1.Inference/Generate\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &text,
            "lmx_tokens_generated_total{model=\"tiny/metrics@main\"}"
        ) >= tokens
    );
    assert!(
        sample(
            &text,
            "lmx_time_to_first_token_seconds_count{model=\"tiny/metrics@main\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &text,
            "lmx_token_latency_seconds_bucket{model=\"tiny/metrics@main\",le=\"+Inf\"}"
        ) >= tokens - 1.0
    );
    // The forward passes: the prompt in one (it yields the first token), then one per token.
    let steps = |kind: &str| {
        sample(
            &text,
            &format!("lmx_batch_steps_total{{model=\"tiny/metrics@main\",kind=\"{kind}\"}}"),
        )
    };
    assert_eq!(steps("prefill"), 1.0);
    assert_eq!(steps("decode"), tokens - 1.0);
    assert_eq!(steps("mixed"), 0.0);
    assert_eq!(
        sample(
            &text,
            "lmx_batch_sequences_total{model=\"tiny/metrics@main\"}"
        ),
        tokens,
        "one sequence in each pass"
    );
    assert!(
        sample(
            &text,
            "lmx_batch_step_microseconds_total{model=\"tiny/metrics@main\",kind=\"prefill\"}"
        ) > 0.0
    );
    assert_eq!(
        sample(
            &text,
            "lmx_prompt_tokens_computed_total{model=\"tiny/metrics@main\"}"
        ),
        prompt_tokens
    );
    assert_eq!(sample(&text, "lmx_models_loaded"), 1.0);
    assert!(sample(&text, "lmx_model_memory_bytes{model=\"tiny/metrics@main\"}") > 0.0);
    assert_eq!(
        sample(&text, "lmx_queue_depth{model=\"tiny/metrics@main\"}"),
        0.0
    );
    assert!(sample(&text, "lmx_download_bytes_total") >= files.size() as f64);
    assert_eq!(sample(&text, "lmx_downloads_active"), 0.0);
    assert!(
        sample(
            &text,
            "lmx_download_failures_total{code=\"REPO_NOT_FOUND\"}"
        ) >= 1.0
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn sigterm_during_a_generate_stream_drains_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("endless");
    testing::tiny::write_model_with(&model, "llama", 1, |c| {
        c.as_object_mut().unwrap().remove("eos_token_id");
    });
    std::fs::write(
        model.join("generation_config.json"),
        r#"{"eos_token_id": []}"#,
    )
    .unwrap();
    std::fs::write(model.join("tokenizer_config.json"), "{}").unwrap();
    let model_id = model.to_str().unwrap().to_owned();

    let common::Spawned {
        mut child, addr, ..
    } = common::spawn_serve(&[
        "--listen",
        "127.0.0.1:0",
        "--drain-timeout",
        "60s",
        "--cache-dir",
        dir.path().to_str().unwrap(),
    ])
    .await;
    let channel = common::connect(addr).await;
    pb::model_admin_client::ModelAdminClient::new(channel.clone())
        .load_model(pb::LoadModelRequest {
            model_id: model_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut ready = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: "lmx.v1.Inference".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ready.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    let mut inference = pb::inference_client::InferenceClient::new(channel.clone());
    let request = |max| pb::GenerateRequest {
        model_id: model_id.clone(),
        prompt: "go".into(),
        parameters: Some(pb::GenerationParameters {
            max_tokens: Some(max),
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = inference.generate(request(500)).await.unwrap().into_inner();
    stream.next().await.unwrap().unwrap();

    let started = std::time::Instant::now();
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    // Readiness turns NOT_SERVING at once...
    assert_eq!(
        ready.next().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    // ...new calls are refused...
    let refused = inference.clone().generate(request(1)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    // ...and the running stream completes.
    let mut tokens = 1;
    let mut completion = None;
    while let Some(item) = stream.next().await {
        match item.unwrap().item.unwrap() {
            pb::generate_response::Item::Token(_) => tokens += 1,
            pb::generate_response::Item::Completion(c) => completion = Some(c),
        }
    }
    assert_eq!(
        completion.expect("a completion").finish_reason(),
        pb::FinishReason::Length
    );
    assert_eq!(tokens, 500);
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test]
async fn models_named_with_load_are_loaded_at_start_and_turn_the_pod_ready() {
    let dir = tempfile::tempdir().unwrap();
    testing::tiny::write_model(dir.path(), "llama", 1);
    let path = dir.path().to_str().unwrap().to_owned();
    let server = TestServer::start_with(|c| c.preload = vec![(path.clone(), String::new())]).await;
    let mut ready = HealthClient::new(server.channel().await)
        .watch(HealthCheckRequest {
            service: "lmx.v1.Inference".into(),
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let status = ready.next().await.unwrap().unwrap().status;
        if status == ServingStatus::Serving as i32 {
            break;
        }
    }
    let models = pb::model_admin_client::ModelAdminClient::new(server.channel().await)
        .list_models(pb::ListModelsRequest { loaded_only: true })
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models[0].model_id, path);
    assert_eq!(
        lmx::manager::reference::split("org/m@v1"),
        ("org/m".to_owned(), "v1".to_owned())
    );
    assert_eq!(
        lmx::manager::reference::split("/data/m@x"),
        ("/data/m@x".to_owned(), String::new())
    );
    server.stop().await.unwrap();
}
