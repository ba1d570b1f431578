//! Model aliases over gRPC against the real server: `--alias NAME=REFERENCE` at start and
//! `LoadModel.alias`; every RPC accepts the alias, ListModels shows it.

mod common;

use common::{greedy_text, TestServer};
use lmx::{manager::aliases, pb, testing};
use tonic::{transport::Channel, Code};
use tonic_types::StatusExt;

const COMMIT: &str = "5555555555555555555555555555555555555555";

type Admin = pb::model_admin_client::ModelAdminClient<Channel>;
type Inference = pb::inference_client::InferenceClient<Channel>;

fn load(model_id: &str, alias: &str) -> pb::LoadModelRequest {
    pb::LoadModelRequest {
        model_id: model_id.into(),
        alias: alias.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn aliases_from_flags_and_load_model_name_models_in_every_rpc() {
    let server = TestServer::start_with(|c| {
        c.aliases = vec![aliases::parse_flag("smol=tiny/llama").unwrap()];
    })
    .await;
    for (repo, arch) in [("tiny/llama", "llama"), ("tiny/qwen2", "qwen2")] {
        testing::write_hf_cache(
            &server.cache_dir(),
            repo,
            COMMIT,
            Some("main"),
            &testing::tiny_repo(arch, 1),
        );
    }
    let channel = server.channel().await;
    let mut admin = Admin::new(channel.clone());
    let mut inference = Inference::new(channel);

    // The flag's alias is listed on the snapshot before anything is loaded.
    let listed = |models: Vec<pb::ModelInfo>, id: &str| {
        models
            .into_iter()
            .find(|m| m.model_id == id)
            .unwrap_or_else(|| panic!("{id} not listed"))
    };
    let models = admin
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(listed(models, "tiny/llama").aliases, ["smol"]);

    let verified = admin
        .verify_model(pb::VerifyModelRequest {
            model_id: "smol".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(verified.complete);

    let loaded = admin
        .load_model(load("smol", ""))
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    assert_eq!(loaded.model_id, "tiny/llama");
    assert_eq!(loaded.aliases, ["smol"]);
    let loaded = admin
        .load_model(load("tiny/qwen2", "q"))
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    assert_eq!(loaded.aliases, ["q"]);

    // Inference by alias is inference on the model it names.
    assert_eq!(
        greedy_text(&mut inference, "smol").await.unwrap(),
        greedy_text(&mut inference, "tiny/llama").await.unwrap()
    );
    assert_eq!(
        greedy_text(&mut inference, "q").await.unwrap(),
        greedy_text(&mut inference, "tiny/qwen2").await.unwrap()
    );
    let tokens = inference
        .tokenize(pb::TokenizeRequest {
            model_id: "q".into(),
            text: "Hi".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(tokens.len(), 2);

    let models = admin
        .list_models(pb::ListModelsRequest { loaded_only: true })
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(listed(models.clone(), "tiny/llama").aliases, ["smol"]);
    assert_eq!(listed(models, "tiny/qwen2").aliases, ["q"]);

    // An alias names its revision; a bad alias name is refused before anything loads.
    let err = inference
        .tokenize(pb::TokenizeRequest {
            model_id: "smol".into(),
            revision: "main".into(),
            text: "Hi".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "revision"
    );
    let err = admin
        .load_model(load("tiny/qwen2", "not/an-alias"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("not/an-alias"), "{}", err.message());

    admin
        .unload_model(pb::UnloadModelRequest {
            model_id: "q".into(),
            revision: String::new(),
        })
        .await
        .unwrap();
    let err = greedy_text(&mut inference, "q").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    server.stop().await.unwrap();
}
