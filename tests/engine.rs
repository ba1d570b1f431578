//! The inference engine over gRPC against the real server, on tiny random models (fixed seeds):
//! load/unload/list, health, the snapshot guard, validation, streaming, seeds, cancellation,
//! queue limits, memory budget and LRU eviction, keep_alive, unload during a stream, tokenize,
//! chat and embeddings.

mod common;

use std::time::Duration;

use common::TestServer;
use lmx::{pb, testing};
use tokio_stream::StreamExt;
use tonic::{transport::Channel, Code};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_types::StatusExt;

const COMMIT: &str = "3333333333333333333333333333333333333333";

type Admin = pb::model_admin_client::ModelAdminClient<Channel>;
type Inference = pb::inference_client::InferenceClient<Channel>;

struct Clients {
    admin: Admin,
    inference: Inference,
}

async fn clients(server: &TestServer) -> Clients {
    let channel = server.channel().await;
    Clients {
        admin: Admin::new(channel.clone()),
        inference: Inference::new(channel),
    }
}

fn put_tiny(server: &TestServer, repo: &str, arch: &str, seed: u64) {
    testing::write_hf_cache(
        &server.cache_dir(),
        repo,
        COMMIT,
        Some("main"),
        &testing::tiny_repo(arch, seed),
    );
}

async fn load(
    admin: &mut Admin,
    model_id: &str,
    options: Option<pb::LoadOptions>,
) -> Result<pb::LoadModelResponse, tonic::Status> {
    common::load_model(admin, model_id, options).await
}

fn params(max_tokens: i32) -> Option<pb::GenerationParameters> {
    Some(pb::GenerationParameters {
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    })
}

fn generate_request(
    model_id: &str,
    prompt: &str,
    parameters: Option<pb::GenerationParameters>,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model_id: model_id.into(),
        revision: String::new(),
        prompt: prompt.into(),
        parameters,
        add_special_tokens: false,
    }
}

/// Runs a generation to the end: (token ids, completion).
async fn generate(
    inference: &mut Inference,
    request: pb::GenerateRequest,
) -> Result<(Vec<pb::Token>, pb::Completion), tonic::Status> {
    let mut stream = inference.generate(request).await?.into_inner();
    let mut tokens = Vec::new();
    while let Some(item) = stream.next().await {
        match item?.item.expect("an item") {
            pb::generate_response::Item::Token(t) => tokens.push(t),
            pb::generate_response::Item::Completion(c) => {
                assert!(
                    stream.next().await.is_none(),
                    "the completion is the last message"
                );
                return Ok((tokens, c));
            }
        }
    }
    panic!("the stream ended without a completion");
}

/// Chat with one user message, greedy, `max_tokens` at most; the final completion.
async fn chat_one(
    inference: &mut Inference,
    model_id: &str,
    content: &str,
    max_tokens: i32,
) -> pb::Completion {
    let request = pb::ChatRequest {
        model_id: model_id.into(),
        revision: String::new(),
        messages: vec![pb::ChatMessage {
            role: "user".into(),
            content: content.into(),
        }],
        parameters: params(max_tokens),
    };
    let mut stream = inference.chat(request).await.unwrap().into_inner();
    let mut completion = None;
    while let Some(item) = stream.next().await {
        if let pb::chat_response::Item::Completion(c) = item.unwrap().item.unwrap() {
            completion = Some(c);
        }
    }
    completion.expect("the stream ends with a completion")
}

/// The loaded models (ListModels also lists the snapshots on disk; these tests look at loads).
async fn list(admin: &mut Admin) -> Vec<pb::ModelInfo> {
    admin
        .list_models(pb::ListModelsRequest { loaded_only: true })
        .await
        .unwrap()
        .into_inner()
        .models
}

/// Polls `check` until it holds (bounded), for effects that happen on the engine thread.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn load_generate_unload_with_health_following() {
    let server = TestServer::start().await;
    put_tiny(&server, "tiny/llama", "llama", 1);
    let mut c = clients(&server).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "lmx.v1.Inference".into(),
        })
        .await
        .unwrap()
        .into_inner();
    async fn next_status(
        watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    ) -> ServingStatus {
        ServingStatus::try_from(watch.next().await.unwrap().unwrap().status).unwrap()
    }
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);

    let loaded = load(&mut c.admin, "tiny/llama", None).await.unwrap();
    assert!(!loaded.already_loaded);
    let model = loaded.model.unwrap();
    assert_eq!(model.state(), pb::ModelState::Loaded);
    assert_eq!(model.architecture, "llama");
    assert_eq!(model.commit_sha, COMMIT);
    assert_eq!(model.revision, "main");
    assert_eq!(model.context_length, 512);
    assert!(model.memory_bytes > 0);
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);

    let again = load(&mut c.admin, "tiny/llama", None).await.unwrap();
    assert!(again.already_loaded, "loading a loaded model is a no-op");

    let (tokens, completion) = generate(
        &mut c.inference,
        generate_request("tiny/llama", "hello", params(6)),
    )
    .await
    .unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 6);
    assert_eq!(completion.prompt_tokens, 5);
    assert_eq!(completion.completion_tokens as usize, tokens.len());
    assert_eq!(
        completion.text,
        tokens.iter().map(|t| t.text.as_str()).collect::<String>()
    );
    assert!(completion.time_to_first_token_ms > 0.0);

    let listed = list(&mut c.admin).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].request_count, 1);
    assert!(listed[0].last_used_at.is_some() && listed[0].loaded_at.is_some());
    assert!(listed[0].tokens_generated >= tokens.len() as u64);

    let unloaded = c
        .admin
        .unload_model(pb::UnloadModelRequest {
            model_id: "tiny/llama".into(),
            revision: "main".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unloaded.freed_memory_bytes, model.memory_bytes);
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    let err = generate(
        &mut c.inference,
        generate_request("tiny/llama", "hello", params(2)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "MODEL_NOT_LOADED"
    );
    let err = c
        .admin
        .unload_model(pb::UnloadModelRequest {
            model_id: "tiny/llama".into(),
            revision: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn local_folders_and_every_architecture_load_over_grpc() {
    let server = TestServer::start().await;
    let mut c = clients(&server).await;
    for arch in testing::tiny::ARCHITECTURES {
        let dir = server.cache.path().join(format!("local-{arch}"));
        testing::tiny::write_model(&dir, arch, 2);
        let path = dir.to_str().unwrap();
        let loaded = load(&mut c.admin, path, None)
            .await
            .unwrap_or_else(|e| panic!("{arch}: {e:?}"));
        assert_eq!(loaded.model.unwrap().architecture, *arch);
        let (tokens, _) = generate(&mut c.inference, generate_request(path, "hi", params(3)))
            .await
            .unwrap();
        assert!(!tokens.is_empty(), "{arch}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_loads_of_one_model_coalesce() {
    let server = TestServer::start().await;
    put_tiny(&server, "tiny/llama", "llama", 1);
    let c = clients(&server).await;
    let (mut a, mut b) = (c.admin.clone(), c.admin.clone());
    let (ra, rb) = tokio::join!(
        load(&mut a, "tiny/llama", None),
        load(&mut b, "tiny/llama", None)
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra.model.as_ref().unwrap().loaded_at,
        rb.model.as_ref().unwrap().loaded_at,
        "one load, shared"
    );
    let mut admin = c.admin.clone();
    assert_eq!(list(&mut admin).await.len(), 1);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn incomplete_snapshots_are_refused_with_their_problems() {
    let server = TestServer::start().await;
    let mut files = testing::tiny_repo("llama", 1);
    files.remove("tokenizer.json");
    let shard = files.0.get_mut("model.safetensors").unwrap();
    shard.truncate(shard.len() - 10);
    testing::write_hf_cache(
        &server.cache_dir(),
        "tiny/broken",
        COMMIT,
        Some("main"),
        &files,
    );
    let mut c = clients(&server).await;
    let err = load(&mut c.admin, "tiny/broken", None).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "SNAPSHOT_INCOMPLETE"
    );
    let violations = err.get_details_precondition_failure().unwrap().violations;
    let mut kinds: Vec<(String, String)> = violations
        .iter()
        .map(|v| (v.r#type.clone(), v.subject.clone()))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("MISSING_TOKENIZER".to_owned(), "tokenizer.json".to_owned()),
            ("TRUNCATED_FILE".to_owned(), "model.safetensors".to_owned()),
        ]
    );
    assert!(list(&mut c.admin).await.is_empty(), "nothing was loaded");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn unsupported_architectures_and_unknown_models_are_refused() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    testing::tiny::write_model_with(dir.path(), "llama", 1, |c| c["model_type"] = "rwkv".into());
    testing::write_hf_cache(
        &server.cache_dir(),
        "tiny/rwkv",
        COMMIT,
        Some("main"),
        &testing::RepoFiles::from_dir(dir.path()),
    );
    let mut c = clients(&server).await;
    let err = load(&mut c.admin, "tiny/rwkv", None).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let info = err.get_details_error_info().unwrap();
    assert_eq!(info.reason, "UNSUPPORTED_ARCHITECTURE");
    assert_eq!(info.metadata["model_type"], "rwkv");
    assert!(err.message().contains("rwkv"));

    let err = load(&mut c.admin, "tiny/nothing", None).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = generate(
        &mut c.inference,
        generate_request("tiny/nothing", "x", params(1)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "MODEL_NOT_FOUND"
    );
    let bad_device = Some(pb::LoadOptions {
        device: "tpu".into(),
        ..Default::default()
    });
    let err = load(&mut c.admin, "tiny/rwkv", bad_device)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "options.device"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn invalid_generation_parameters_name_field_limit_and_value() {
    let server = TestServer::start_with(|c| c.engine.load.limits.max_tokens_cap = 100).await;
    put_tiny(&server, "tiny/llama", "llama", 1);
    let mut c = clients(&server).await;
    load(&mut c.admin, "tiny/llama", None).await.unwrap();
    let p = |f: fn(&mut pb::GenerationParameters)| {
        let mut p = pb::GenerationParameters::default();
        f(&mut p);
        Some(p)
    };
    let cases: Vec<(&str, Option<pb::GenerationParameters>, &str, &str)> = vec![
        (
            "x",
            p(|p| p.max_tokens = Some(0)),
            "max_tokens",
            "`max_tokens` must be >= 1. Given: 0",
        ),
        (
            "x",
            p(|p| p.max_tokens = Some(101)),
            "max_tokens",
            "`max_tokens` must be <= 100. Given: 101",
        ),
        (
            "x",
            p(|p| p.temperature = Some(-1.0)),
            "temperature",
            "`temperature` must be >= 0. Given: -1",
        ),
        (
            "x",
            p(|p| p.top_p = Some(1.5)),
            "top_p",
            "`top_p` must be > 0 and <= 1. Given: 1.5",
        ),
        (
            "x",
            p(|p| p.top_k = Some(-2)),
            "top_k",
            "`top_k` must be >= 0. Given: -2",
        ),
        (
            "x",
            p(|p| p.repetition_penalty = Some(0.0)),
            "repetition_penalty",
            "`repetition_penalty` must be > 0. Given: 0",
        ),
        (
            "x",
            p(|p| p.stop = vec!["a".into(); 5]),
            "stop",
            "`stop` must have at most 4 strings. Given: 5",
        ),
        ("", None, "prompt", "`prompt` must not be empty"),
    ];
    for (prompt, parameters, field, message) in cases {
        let err = generate(
            &mut c.inference,
            generate_request("tiny/llama", prompt, parameters),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains(message),
            "{:?} lacks {message:?}",
            err.message()
        );
        assert_eq!(
            err.get_details_bad_request().unwrap().field_violations[0].field,
            field
        );
    }
    // The context bound: 500 prompt tokens + 100 > 512.
    let long = "a".repeat(500);
    let err = generate(
        &mut c.inference,
        generate_request("tiny/llama", &long, params(100)),
    )
    .await
    .unwrap_err();
    assert!(
        err.message()
            .contains("must be <= 512 (the model's context length). Given: 500 + 100 = 600"),
        "{}",
        err.message()
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn seeds_reproduce_sampled_streams_with_logprobs() {
    let server = TestServer::start().await;
    put_tiny(&server, "tiny/llama", "llama", 1);
    let mut c = clients(&server).await;
    load(&mut c.admin, "tiny/llama", None).await.unwrap();
    let sampled = |seed| {
        Some(pb::GenerationParameters {
            max_tokens: Some(12),
            temperature: Some(1.2),
            top_p: Some(0.9),
            top_k: Some(40),
            repetition_penalty: Some(1.1),
            seed: Some(seed),
            logprobs: true,
            ..Default::default()
        })
    };
    let run = |seed| {
        let mut inference = c.inference.clone();
        async move {
            let (tokens, _) = generate(
                &mut inference,
                generate_request("tiny/llama", "seeded", sampled(seed)),
            )
            .await
            .unwrap();
            assert!(tokens.iter().all(|t| t.logprob.is_some_and(|l| l <= 0.0)));
            tokens.iter().map(|t| t.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(run(11).await, run(11).await);
    let (plain, _) = generate(
        &mut c.inference,
        generate_request("tiny/llama", "seeded", params(3)),
    )
    .await
    .unwrap();
    assert!(
        plain.iter().all(|t| t.logprob.is_none()),
        "logprobs only when asked"
    );
    server.stop().await.unwrap();
}

/// A tiny llama without end-of-sequence ids: it generates until max_tokens.
fn put_endless(server: &TestServer, repo: &str) {
    let dir = tempfile::tempdir().unwrap();
    testing::tiny::write_model_with(dir.path(), "llama", 1, |c| {
        c.as_object_mut().unwrap().remove("eos_token_id");
    });
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": []}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
    testing::write_hf_cache(
        &server.cache_dir(),
        repo,
        COMMIT,
        Some("main"),
        &testing::RepoFiles::from_dir(dir.path()),
    );
}

#[tokio::test]
async fn stop_strings_and_end_of_sequence_ids_end_streams() {
    let server = TestServer::start().await;
    put_endless(&server, "tiny/endless");
    let mut c = clients(&server).await;
    load(&mut c.admin, "tiny/endless", None).await.unwrap();
    let (reference, completion) = generate(
        &mut c.inference,
        generate_request("tiny/endless", "abc", params(24)),
    )
    .await
    .unwrap();
    assert_eq!(completion.finish_reason(), pb::FinishReason::Length);
    assert_eq!(reference.len(), 24);

    // A stop string spanning the boundary of tokens 6 and 7: matched, not emitted.
    let before: String = reference[..6].iter().map(|t| t.text.as_str()).collect();
    let stop: String = reference[6..8].iter().map(|t| t.text.as_str()).collect();
    assert!(
        stop.chars().count() >= 2 && !before.contains(&stop),
        "fixture text {:?}",
        completion.text
    );
    let with_stop = Some(pb::GenerationParameters {
        stop: vec![stop.clone(), "never matches".into()],
        ..params(24).unwrap()
    });
    let (tokens, completion) = generate(
        &mut c.inference,
        generate_request("tiny/endless", "abc", with_stop),
    )
    .await
    .unwrap();
    assert_eq!(completion.finish_reason(), pb::FinishReason::StopSequence);
    assert_eq!(completion.stop_sequence, stop);
    assert_eq!(completion.text, before);
    assert_eq!(
        tokens.iter().map(|t| t.text.as_str()).collect::<String>(),
        before
    );

    // The 5th generated token as an end-of-sequence id of another copy of the model.
    let eos = reference[4].id;
    let first = reference.iter().position(|t| t.id == eos).unwrap();
    let dir = tempfile::tempdir().unwrap();
    testing::tiny::write_model_with(dir.path(), "llama", 1, |c| {
        c.as_object_mut().unwrap().remove("eos_token_id");
    });
    std::fs::write(
        dir.path().join("generation_config.json"),
        format!(r#"{{"eos_token_id": [{eos}, 9999]}}"#),
    )
    .unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
    let path = dir.path().to_str().unwrap();
    load(&mut c.admin, path, None).await.unwrap();
    let (tokens, completion) =
        generate(&mut c.inference, generate_request(path, "abc", params(24)))
            .await
            .unwrap();
    assert_eq!(completion.finish_reason(), pb::FinishReason::EosToken);
    assert_eq!(tokens.len(), first + 1);
    assert_eq!(tokens.last().unwrap().id, eos);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn cancelling_a_stream_stops_generation_and_a_full_queue_refuses_at_once() {
    let server = TestServer::start_with(|c| c.engine.load.max_queue = 1).await;
    put_endless(&server, "tiny/endless");
    let mut c = clients(&server).await;
    load(&mut c.admin, "tiny/endless", None).await.unwrap();

    let mut stream = c
        .inference
        .generate(generate_request("tiny/endless", "go", params(450)))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    let err = generate(
        &mut c.inference,
        generate_request("tiny/endless", "x", params(1)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(err.get_details_error_info().unwrap().reason, "QUEUE_FULL");

    drop(stream);
    let mut admin = c.admin.clone();
    eventually("the slot to be freed", || {
        let mut admin = admin.clone();
        async move { list(&mut admin).await[0].requests_in_flight == 0 }
    })
    .await;
    let model = &list(&mut admin).await[0];
    // The engine runs ahead of a client (its channel is unbounded), so the bound is the
    // request's length: the generation stopped before its end.
    assert!(
        model.tokens_generated < 450,
        "generation went on after the client left: {} tokens",
        model.tokens_generated
    );
    generate(
        &mut c.inference,
        generate_request("tiny/endless", "x", params(1)),
    )
    .await
    .unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn unloading_during_a_stream_lets_the_stream_finish() {
    let server = TestServer::start().await;
    put_endless(&server, "tiny/endless");
    let mut c = clients(&server).await;
    load(&mut c.admin, "tiny/endless", None).await.unwrap();
    let mut stream = c
        .inference
        .generate(generate_request("tiny/endless", "go", params(60)))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    c.admin
        .unload_model(pb::UnloadModelRequest {
            model_id: "tiny/endless".into(),
            revision: String::new(),
        })
        .await
        .unwrap();
    // New requests no longer find it...
    let err = generate(
        &mut c.inference,
        generate_request("tiny/endless", "x", params(1)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // ...while the running stream completes normally.
    let mut tokens = 1;
    let mut completion = None;
    while let Some(item) = stream.next().await {
        match item.unwrap().item.unwrap() {
            pb::generate_response::Item::Token(_) => tokens += 1,
            pb::generate_response::Item::Completion(c) => completion = Some(c),
        }
    }
    let completion = completion.expect("a completion");
    assert_eq!(completion.finish_reason(), pb::FinishReason::Length);
    assert_eq!(tokens, 60);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_memory_budget_evicts_the_least_recently_used_idle_model() {
    let estimate = lmx::engine::estimate_memory(
        &{
            let dir = tempfile::tempdir().unwrap().keep();
            testing::tiny::write_model(&dir, "llama", 1);
            dir
        },
        None,
        "cpu",
    )
    .unwrap();
    // A model holds its weights and the KV caches of --max-concurrent full-context sequences.
    assert!(estimate.kv_bytes_per_token > 0 && estimate.context_length == 512);
    let bytes = estimate.weights + estimate.kv_for(2);
    // Room for two tiny models, not three.
    let server = TestServer::start_with(|c| {
        c.engine.memory_budget = bytes * 2 + bytes / 2;
        c.engine.load.max_concurrent = 2;
    })
    .await;
    for (repo, seed) in [("tiny/a", 1), ("tiny/b", 2), ("tiny/c", 3)] {
        put_tiny(&server, repo, "llama", seed);
    }
    let mut c = clients(&server).await;
    load(&mut c.admin, "tiny/a", None).await.unwrap();
    load(&mut c.admin, "tiny/b", None).await.unwrap();
    // Use a, so b is the least recently used.
    generate(&mut c.inference, generate_request("tiny/a", "x", params(1)))
        .await
        .unwrap();
    load(&mut c.admin, "tiny/c", None).await.unwrap();
    let names: Vec<String> = list(&mut c.admin)
        .await
        .into_iter()
        .map(|m| m.model_id)
        .collect();
    assert_eq!(names, ["tiny/a", "tiny/c"]);

    server.stop().await.unwrap();

    // With every loaded model busy, nothing can be evicted: RESOURCE_EXHAUSTED.
    let server = TestServer::start_with(|c| {
        c.engine.memory_budget = bytes * 2 + bytes / 2;
        c.engine.load.max_concurrent = 2;
    })
    .await;
    put_endless(&server, "tiny/busy1");
    put_endless(&server, "tiny/busy2");
    put_tiny(&server, "tiny/b", "llama", 2);
    let mut c = clients(&server).await;
    load(&mut c.admin, "tiny/busy1", None).await.unwrap();
    load(&mut c.admin, "tiny/busy2", None).await.unwrap();
    // Each busy model has many long requests queued behind its two running ones (thousands of
    // decode steps in all), so it stays busy long after the load below however fast the
    // tiny model decodes.
    let mut streams = Vec::new();
    for model in ["tiny/busy1", "tiny/busy2"] {
        for i in 0..16 {
            let mut s = c
                .inference
                .clone()
                .generate(generate_request(model, "x", params(450)))
                .await
                .unwrap()
                .into_inner();
            if i == 0 {
                s.next().await.unwrap().unwrap();
            }
            streams.push(s);
        }
    }
    let err = load(&mut c.admin, "tiny/b", None).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "MEMORY_BUDGET_EXCEEDED"
    );
    assert!(
        err.message().contains("no idle model can be evicted"),
        "{}",
        err.message()
    );
    drop(streams);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn keep_alive_unloads_an_idle_model() {
    let server = TestServer::start().await;
    put_tiny(&server, "tiny/llama", "llama", 1);
    let mut c = clients(&server).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "lmx.v1.Inference".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    let options = Some(pb::LoadOptions {
        keep_alive: Some(prost_types::Duration {
            seconds: 0,
            nanos: 300_000_000,
        }),
        ..Default::default()
    });
    let loaded = load(&mut c.admin, "tiny/llama", options).await.unwrap();
    assert_eq!(loaded.model.unwrap().keep_alive.unwrap().nanos, 300_000_000);
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    // Nothing uses it: it goes on its own, and health follows.
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    assert!(list(&mut c.admin).await.is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn tokenize_chat_and_embed() {
    let server = TestServer::start().await;
    put_tiny(&server, "tiny/llama", "llama", 1);
    let bert = tempfile::tempdir().unwrap();
    testing::tiny::write_bert(bert.path(), 4);
    testing::write_hf_cache(
        &server.cache_dir(),
        "tiny/bert",
        COMMIT,
        Some("main"),
        &testing::RepoFiles::from_dir(bert.path()),
    );
    let mut c = clients(&server).await;
    load(&mut c.admin, "tiny/llama", None).await.unwrap();
    load(&mut c.admin, "tiny/bert", None).await.unwrap();

    let tokens = c
        .inference
        .tokenize(pb::TokenizeRequest {
            model_id: "tiny/llama".into(),
            revision: String::new(),
            text: "<|im_start|>é".into(),
            add_special_tokens: false,
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(tokens.len(), 3);
    assert!(tokens[0].special);
    assert_eq!((tokens[1].start, tokens[2].end), (12, 14));

    let completion = chat_one(&mut c.inference, "tiny/llama", "Hi", 4).await;
    // The template renders "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n
    // <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n": 5 special tokens, and one
    // token per byte of the rest.
    let text_bytes = "system\nYou are a helpful AI assistant.\nuser\nHi\nassistant\n".len() as u32;
    assert_eq!(completion.prompt_tokens, 5 + text_bytes);

    let err = c
        .inference
        .chat(pb::ChatRequest {
            model_id: "tiny/llama".into(),
            revision: String::new(),
            messages: vec![],
            parameters: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let embedded = c
        .inference
        .embed(pb::EmbedRequest {
            model_id: "tiny/bert".into(),
            revision: String::new(),
            inputs: vec!["one".into(), "two words".into()],
            normalize: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(embedded.embeddings.len(), 2);
    assert_eq!(embedded.dimensions, 32);
    for e in &embedded.embeddings {
        let norm: f32 = e.values.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
    let err = generate(
        &mut c.inference,
        generate_request("tiny/bert", "x", params(1)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "WRONG_MODEL_KIND"
    );
    server.stop().await.unwrap();
}

/// A SentencePiece GGUF with no tokenizer.json: the server builds the tokenizer from the GGUF
/// metadata, tokenizes as transformers does (recorded in tests/data/spm_reference.json), keeps
/// control tokens whole in a chat prompt, and generates.
#[tokio::test]
async fn a_sentencepiece_gguf_serves_with_its_own_tokenizer() {
    let server = TestServer::start().await;
    let mut files = testing::RepoFiles::default();
    files.insert("model.Q8_0.gguf", testing::tiny::spm_llama_gguf(5));
    testing::write_hf_cache(
        &server.cache_dir(),
        "tiny/spm-gguf",
        COMMIT,
        Some("main"),
        &files,
    );
    let mut c = clients(&server).await;
    load(&mut c.admin, "tiny/spm-gguf", None).await.unwrap();
    let info = list(&mut c.admin).await;
    assert_eq!(info[0].format(), pb::WeightFormat::Gguf);
    assert_eq!(info[0].context_length, 512);

    let reference = common::models::reference("spm_reference.json");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    let mut inst_prompt = Vec::new();
    for case in reference["layouts"]["llama"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        for (add_special_tokens, key) in [(false, "ids"), (true, "ids_with_special")] {
            let tokens = c
                .inference
                .tokenize(pb::TokenizeRequest {
                    model_id: "tiny/spm-gguf".into(),
                    revision: String::new(),
                    text: text.into(),
                    add_special_tokens,
                })
                .await
                .unwrap()
                .into_inner()
                .tokens;
            let got: Vec<u32> = tokens.iter().map(|t| t.id).collect();
            assert_eq!(got, ids(&case[key]), "{key} of {text:?}");
            if text == "[INST] What is 2+2? [/INST]" && add_special_tokens {
                assert!(tokens[0].special && tokens[1].special, "{tokens:?}");
                inst_prompt = got;
            }
        }
    }

    // The chat template renders "<s>[INST] What is 2+2? [/INST]": BOS and the control tokens are
    // one token each, so the prompt is exactly the reference's ids with BOS.
    let completion = chat_one(&mut c.inference, "tiny/spm-gguf", "What is 2+2?", 6).await;
    assert!(!inst_prompt.is_empty());
    assert_eq!(completion.prompt_tokens as usize, inst_prompt.len());

    // Greedy generation streams tokens whose texts add up to the completion's text.
    let (tokens, done) = generate(
        &mut c.inference,
        generate_request("tiny/spm-gguf", "Hello world", params(8)),
    )
    .await
    .unwrap();
    assert_eq!(done.completion_tokens as usize, tokens.len());
    assert!(!tokens.is_empty());
    let streamed: String = tokens.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(streamed, done.text);
    server.stop().await.unwrap();
}

/// A chat's second turn reuses the first turn's KV (Completion.cached_prompt_tokens) and
/// answers as a server without a prefix cache does; ListModels shows the KV reservation.
#[tokio::test]
async fn a_second_turn_reuses_the_first_turns_kv_cache() {
    let cached = TestServer::start().await;
    let uncached = TestServer::start_with(|c| c.engine.load.prefix_cache = false).await;
    let mut answers = Vec::new();
    for server in [&cached, &uncached] {
        put_tiny(server, "tiny/llama", "llama", 41);
        let mut c = clients(server).await;
        load(&mut c.admin, "tiny/llama", None).await.unwrap();
        let first = "<|im_start|>user\nname three colours<|im_end|>\n<|im_start|>assistant\n";
        let (_, one) = generate(
            &mut c.inference,
            generate_request("tiny/llama", first, params(10)),
        )
        .await
        .unwrap();
        assert_eq!(one.cached_prompt_tokens, 0);
        let second = format!(
            "{first}{}<|im_end|>\n<|im_start|>user\nand two more",
            one.text
        );
        let (tokens, two) = generate(
            &mut c.inference,
            generate_request("tiny/llama", &second, params(10)),
        )
        .await
        .unwrap();
        let info = &list(&mut c.admin).await[0];
        assert!(info.kv_cache_bytes > 0 && info.memory_bytes > info.kv_cache_bytes);
        assert!(info.kv_cache_used_bytes <= info.kv_cache_bytes);
        answers.push((
            tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
            two.text,
            two.cached_prompt_tokens,
            one.prompt_tokens,
        ));
    }
    let (hit, miss) = (&answers[0], &answers[1]);
    assert_eq!((&hit.0, &hit.1), (&miss.0, &miss.1));
    assert!(
        hit.2 >= hit.3,
        "the first turn's {} prompt tokens were cached: {}",
        hit.3,
        hit.2
    );
    assert_eq!(miss.2, 0);
    cached.stop().await.unwrap();
    uncached.stop().await.unwrap();
}

/// A request whose KV cache can never fit in the model's share of the memory budget is refused
/// with RESOURCE_EXHAUSTED and the numbers.
#[tokio::test]
async fn a_request_larger_than_the_kv_budget_is_refused_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap().keep();
    testing::tiny::write_model(&dir, "llama", 1);
    let estimate = lmx::engine::estimate_memory(&dir, None, "cpu").unwrap();
    // The weights and 100 tokens of KV cache.
    let kv = 100 * estimate.kv_bytes_per_token;
    let server = TestServer::start_with(|c| c.engine.memory_budget = estimate.weights + kv).await;
    put_tiny(&server, "tiny/llama", "llama", 1);
    let mut c = clients(&server).await;
    load(&mut c.admin, "tiny/llama", None).await.unwrap();
    assert_eq!(list(&mut c.admin).await[0].kv_cache_bytes, kv);
    let err = generate(
        &mut c.inference,
        generate_request("tiny/llama", "hello", params(300)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let info = err.get_details_error_info().unwrap();
    assert_eq!(info.reason, "KV_CACHE_BUDGET_EXCEEDED");
    assert_eq!(info.metadata["budget_bytes"], kv.to_string());
    assert!(err.message().contains(&kv.to_string()), "{}", err.message());
    // One that fits runs.
    generate(
        &mut c.inference,
        generate_request("tiny/llama", "hello", params(50)),
    )
    .await
    .unwrap();
    server.stop().await.unwrap();
}
