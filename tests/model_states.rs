//! Honest model states over gRPC against the real server: a failed load is listed FAILED with
//! its error until the next load or a delete; LoadModel of a loaded model with another dtype or
//! device is refused, never answered with the instance that is there.

mod common;

use common::TestServer;
use lmx::{pb, testing};
use tonic::{transport::Channel, Code};
use tonic_types::StatusExt;

const COMMIT: &str = "4444444444444444444444444444444444444444";

type Admin = pb::model_admin_client::ModelAdminClient<Channel>;

fn put(server: &TestServer, repo: &str, files: &testing::RepoFiles) {
    testing::write_hf_cache(&server.cache_dir(), repo, COMMIT, Some("main"), files);
}

async fn listed(admin: &mut Admin, model_id: &str) -> Vec<pb::ModelInfo> {
    admin
        .list_models(pb::ListModelsRequest { loaded_only: false })
        .await
        .unwrap()
        .into_inner()
        .models
        .into_iter()
        .filter(|m| m.model_id == model_id)
        .collect()
}

#[tokio::test]
async fn a_failed_load_is_listed_failed_until_the_next_load_or_a_delete() {
    let server = TestServer::start().await;
    let mut files = testing::tiny_repo("llama", 1);
    let mut config: serde_json::Value =
        serde_json::from_slice(files.get("config.json").unwrap()).unwrap();
    config["model_type"] = "nonesuch".into();
    files.insert("config.json", serde_json::to_vec(&config).unwrap());
    put(&server, "tiny/broken", &files);
    let mut admin = Admin::new(server.channel().await);

    let before = listed(&mut admin, "tiny/broken").await;
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].state(), pb::ModelState::Available);

    let err = common::load_model(&mut admin, "tiny/broken", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let after = listed(&mut admin, "tiny/broken").await;
    assert_eq!(after.len(), 1, "listed once: {after:?}");
    assert_eq!(after[0].state(), pb::ModelState::Failed);
    assert_eq!(after[0].state_message, err.message());
    assert!(after[0].state_message.contains("nonesuch"), "{after:?}");
    assert_eq!(after[0].revision, "main");
    assert!(!after[0].path.is_empty());
    assert!(after[0].size_on_disk_bytes > 0);
    let loaded_only = admin
        .list_models(pb::ListModelsRequest { loaded_only: true })
        .await
        .unwrap()
        .into_inner()
        .models;
    assert!(loaded_only.is_empty(), "a failed load is not loaded");

    // The next load replaces the state; it fails again, and the error is there again.
    common::load_model(&mut admin, "tiny/broken", None)
        .await
        .unwrap_err();
    assert_eq!(
        listed(&mut admin, "tiny/broken").await[0].state(),
        pb::ModelState::Failed
    );

    // A delete forgets it.
    admin
        .delete_model(pb::DeleteModelRequest {
            model_id: "tiny/broken".into(),
            revision: String::new(),
        })
        .await
        .unwrap();
    assert!(listed(&mut admin, "tiny/broken").await.is_empty());

    // A model that failed and then loads is LOADED, with no message.
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("m");
    testing::tiny::write_model_with(&folder, "llama", 2, |c| c["model_type"] = "nonesuch".into());
    let folder = folder.to_str().unwrap().to_owned();
    common::load_model(&mut admin, &folder, None)
        .await
        .unwrap_err();
    let failed = listed(&mut admin, &folder).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].state(), pb::ModelState::Failed);
    testing::tiny::write_model(dir.path().join("m").as_path(), "llama", 2);
    common::load_model(&mut admin, &folder, None).await.unwrap();
    let loaded = listed(&mut admin, &folder).await;
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].state(), pb::ModelState::Loaded);
    assert!(loaded[0].state_message.is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn loading_a_loaded_model_with_another_dtype_or_device_is_refused() {
    let server = TestServer::start().await;
    put(&server, "tiny/llama", &testing::tiny_repo("llama", 1));
    let mut admin = Admin::new(server.channel().await);
    let first = common::load_model(&mut admin, "tiny/llama", None)
        .await
        .unwrap();
    assert!(!first.already_loaded);

    // The same options, spelled out or not, find the loaded instance.
    for options in [
        None,
        Some(pb::LoadOptions {
            dtype: pb::Dtype::F32 as i32,
            device: "cpu".into(),
            keep_alive: None,
        }),
    ] {
        assert!(
            common::load_model(&mut admin, "tiny/llama", options)
                .await
                .unwrap()
                .already_loaded
        );
    }

    for (dtype, device, names) in [
        (pb::Dtype::Bf16, "", ["F32", "BF16"]),
        (pb::Dtype::Unspecified, "cuda:1", ["cpu", "cuda:1"]),
    ] {
        let err = common::load_model(
            &mut admin,
            "tiny/llama",
            Some(pb::LoadOptions {
                dtype: dtype as i32,
                device: device.into(),
                keep_alive: None,
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert_eq!(
            err.get_details_error_info().unwrap().reason,
            "LOAD_OPTIONS_CONFLICT"
        );
        for name in names {
            assert!(err.message().contains(name), "{name}: {}", err.message());
        }
    }
    // Still loaded as it was.
    let models = listed(&mut admin, "tiny/llama").await;
    assert_eq!(models[0].state(), pb::ModelState::Loaded);
    assert_eq!(models[0].dtype(), pb::Dtype::F32);
    server.stop().await.unwrap();
}
