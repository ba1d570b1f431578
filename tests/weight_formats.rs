//! Weight formats other than safetensors, over gRPC against the real server, each checked
//! against the same tiny model's safetensors run (greedy ids equal):
//! - PyTorch `pytorch_model.bin` checkpoints (written by `lmx::testing::pytorch`);
//! - GGUF qwen3 and phi3 on candle-transformers' quantized models (the path of GPUs and of
//!   `LMX_NATIVE=0`; phi3 always runs there), as F32 GGUF files with llama.cpp's tensor names.

mod common;

use lmx::{pb, testing};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

type Admin = pb::model_admin_client::ModelAdminClient<Channel>;
type Inference = pb::inference_client::InferenceClient<Channel>;

async fn load(admin: &mut Admin, model_id: &str) -> pb::ModelInfo {
    admin
        .load_model(pb::LoadModelRequest {
            model_id: model_id.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("loading {model_id}: {e:?}"))
        .into_inner()
        .model
        .unwrap()
}

async fn greedy_ids(inference: &mut Inference, model_id: &str) -> Vec<u32> {
    let request = pb::GenerateRequest {
        model_id: model_id.into(),
        revision: String::new(),
        prompt: "<|im_start|>user\nHello world<|im_end|>\n".into(),
        parameters: Some(pb::GenerationParameters {
            max_tokens: Some(12),
            temperature: Some(0.0),
            ..Default::default()
        }),
        add_special_tokens: false,
    };
    let mut stream = inference.generate(request).await.unwrap().into_inner();
    let mut ids = Vec::new();
    while let Some(item) = stream.next().await {
        if let Some(pb::generate_response::Item::Token(t)) = item.unwrap().item {
            ids.push(t.id);
        }
    }
    ids
}

/// A PyTorch checkpoint loads (format PYTORCH_BIN in ListModels) and generates what the same
/// weights generate from safetensors.
#[tokio::test]
async fn pytorch_bin_checkpoints_load_and_match_their_safetensors() {
    let server = common::TestServer::start().await;
    let channel = server.channel().await;
    let mut admin = Admin::new(channel.clone());
    let mut inference = Inference::new(channel);
    let dir = tempfile::tempdir().unwrap();
    for (arch, seed) in [("llama", 3), ("qwen2", 4), ("phi3", 5)] {
        let safetensors = dir.path().join(format!("{arch}-safetensors"));
        testing::tiny::write_model(&safetensors, arch, seed);
        let pytorch = dir.path().join(format!("{arch}-pytorch"));
        testing::tiny::write_model(&pytorch, arch, seed);
        testing::pytorch::safetensors_to_pytorch(&pytorch).unwrap();
        assert!(!pytorch.join("model.safetensors").exists());

        let mut runs = Vec::new();
        for (folder, format) in [
            (&safetensors, pb::WeightFormat::Safetensors),
            (&pytorch, pb::WeightFormat::PytorchBin),
        ] {
            let model_id = folder.to_str().unwrap();
            let loaded = load(&mut admin, model_id).await;
            assert_eq!(loaded.format(), format, "{arch}");
            assert_eq!(loaded.architecture, arch);
            assert!(loaded.memory_bytes > 0, "{loaded:?}");
            runs.push(greedy_ids(&mut inference, model_id).await);
        }
        assert!(!runs[0].is_empty());
        assert_eq!(runs[0], runs[1], "{arch}: .bin and safetensors greedy ids");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn gguf_qwen3_and_phi3_run_on_candle_and_match_their_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let text = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let spawned = common::spawn_serve_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--cache-dir",
            &text(&root.join("cache")),
            "--model-root",
            &text(&root),
        ],
        &[("LMX_NATIVE", "0")],
    )
    .await;
    let channel = common::connect(spawned.addr).await;
    let mut admin = Admin::new(channel.clone());
    let mut inference = Inference::new(channel);

    for (arch, seed) in [("qwen3", 7), ("phi3", 8)] {
        let safetensors = root.join(format!("{arch}-safetensors"));
        testing::tiny::write_model(&safetensors, arch, seed);
        let gguf = root.join(format!("{arch}-gguf"));
        std::fs::create_dir_all(&gguf).unwrap();
        std::fs::write(
            gguf.join(format!("tiny-{arch}-F32.gguf")),
            testing::tiny::gguf_of_tiny(arch, seed),
        )
        .unwrap();
        testing::tiny::write_tokenizer_files(&gguf);
        std::fs::copy(
            safetensors.join("generation_config.json"),
            gguf.join("generation_config.json"),
        )
        .unwrap();

        let mut runs = Vec::new();
        for (folder, format) in [
            (&safetensors, pb::WeightFormat::Safetensors),
            (&gguf, pb::WeightFormat::Gguf),
        ] {
            let model_id = text(folder);
            let loaded = load(&mut admin, &model_id).await;
            assert_eq!(loaded.format(), format, "{arch}");
            assert_eq!(loaded.architecture, arch);
            let ids = greedy_ids(&mut inference, &model_id).await;
            assert!(!ids.is_empty(), "{arch} {format:?} generated nothing");
            runs.push(ids);
        }
        assert_eq!(runs[0], runs[1], "{arch}: GGUF and safetensors greedy ids");
    }
    drop(spawned);
}
