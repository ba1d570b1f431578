//! Model references with GGUF selectors over gRPC on the real server: a snapshot with several
//! quantizations is listed once per file; `org/name:QUANT` and `org/name/FILE.gguf@rev` load that
//! file; no selector loads the default rule's choice and says which; a selector that names no
//! file is NOT_FOUND naming it; a malformed reference is INVALID_ARGUMENT naming the part; a
//! DownloadModel with a selector fetches only that file and the metadata.

mod common;

use candle_core::quantized::GgmlDType;
use common::{hub::HubServer, TestServer};
use lmx::{pb, testing};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const C1: &str = "1111111111111111111111111111111111111111";
const REPO: &str = "tiny/gguf";

type Admin = pb::model_admin_client::ModelAdminClient<Channel>;

fn quants() -> testing::RepoFiles {
    let mut files = testing::RepoFiles::default();
    files.insert(
        "tiny-Q8_0.gguf",
        testing::tiny::spm_llama_gguf_with(1, GgmlDType::Q8_0),
    );
    files.insert(
        "tiny-Q4_0.gguf",
        testing::tiny::spm_llama_gguf_with(1, GgmlDType::Q4_0),
    );
    files.insert(
        "tiny-Q4_1.gguf",
        testing::tiny::spm_llama_gguf_with(1, GgmlDType::Q4_1),
    );
    files
}

async fn load(admin: &mut Admin, model_id: &str) -> Result<pb::LoadModelResponse, tonic::Status> {
    common::load_model(admin, model_id, None).await
}

async fn list(admin: &mut Admin) -> Vec<pb::ModelInfo> {
    admin
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models
}

#[tokio::test]
async fn each_gguf_file_is_listed_and_loadable_by_its_quant_or_its_name() {
    let server = TestServer::start().await;
    let files = quants();
    testing::write_hf_cache(&server.cache_dir(), REPO, C1, Some("main"), &files);
    let mut admin = Admin::new(server.channel().await);

    let models = list(&mut admin).await;
    let listed: Vec<(&str, &str, &str, u64)> = models
        .iter()
        .map(|m| {
            (
                m.model_id.as_str(),
                m.gguf_file.as_str(),
                m.quantization.as_str(),
                m.gguf_file_bytes,
            )
        })
        .collect();
    let size = |f: &str| files.0[f].len() as u64;
    assert_eq!(
        listed,
        [
            (
                "tiny/gguf:Q4_0",
                "tiny-Q4_0.gguf",
                "Q4_0",
                size("tiny-Q4_0.gguf")
            ),
            (
                "tiny/gguf:Q4_1",
                "tiny-Q4_1.gguf",
                "Q4_1",
                size("tiny-Q4_1.gguf")
            ),
            (
                "tiny/gguf:Q8_0",
                "tiny-Q8_0.gguf",
                "Q8_0",
                size("tiny-Q8_0.gguf")
            ),
        ]
    );
    assert!(models
        .iter()
        .all(|m| m.state() == pb::ModelState::Available));

    // A quant selector, case-insensitive: that file.
    let loaded = load(&mut admin, "tiny/gguf:q8_0").await.unwrap();
    assert_eq!(loaded.gguf_file, "tiny-Q8_0.gguf");
    let model = loaded.model.unwrap();
    assert_eq!(model.model_id, "tiny/gguf:Q8_0");
    assert_eq!(model.quantization, "Q8_0");
    assert_eq!(model.gguf_file_bytes, size("tiny-Q8_0.gguf"));
    let mut inference = pb::inference_client::InferenceClient::new(server.channel().await);
    common::greedy_text(&mut inference, "tiny/gguf:Q8_0")
        .await
        .unwrap();

    // No selector: no Q4_K_M, so the smallest file of 4 bits or more, and the reply says which.
    let loaded = load(&mut admin, "tiny/gguf").await.unwrap();
    assert_eq!(loaded.gguf_file, "tiny-Q4_0.gguf");
    assert_eq!(loaded.model.unwrap().quantization, "Q4_0");

    // A file selector with a revision.
    let loaded = load(&mut admin, "tiny/gguf/tiny-Q4_1.gguf@main")
        .await
        .unwrap();
    assert_eq!(loaded.gguf_file, "tiny-Q4_1.gguf");
    let model = loaded.model.unwrap();
    assert_eq!(
        (model.model_id.as_str(), model.revision.as_str()),
        ("tiny/gguf/tiny-Q4_1.gguf", "main")
    );

    // The catalog shows the loaded files as loaded, the rest as on disk.
    let models = list(&mut admin).await;
    let state = |id: &str| {
        models
            .iter()
            .find(|m| m.model_id == id)
            .unwrap_or_else(|| panic!("{id} not listed: {models:?}"))
            .state()
    };
    assert_eq!(state("tiny/gguf:Q8_0"), pb::ModelState::Loaded);
    assert_eq!(state("tiny/gguf"), pb::ModelState::Loaded);
    assert_eq!(state("tiny/gguf/tiny-Q4_1.gguf"), pb::ModelState::Loaded);
    assert!(!models.iter().any(|m| m.model_id == "tiny/gguf:Q4_1"));

    // DeleteModel takes the repository: refused while one of its files is loaded, and a
    // reference with a selector is not a repository.
    let delete = |model_id: &str| pb::DeleteModelRequest {
        model_id: model_id.into(),
        revision: String::new(),
    };
    let status = admin.delete_model(delete("tiny/gguf")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let status = admin
        .delete_model(delete("tiny/gguf:Q8_0"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("selects a GGUF file"),
        "{}",
        status.message()
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn bad_selectors_and_references_name_the_bad_part() {
    let server = TestServer::start().await;
    testing::write_hf_cache(&server.cache_dir(), REPO, C1, Some("main"), &quants());
    let mut admin = Admin::new(server.channel().await);

    let status = load(&mut admin, "tiny/gguf:Q9_X").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains(":Q9_X"), "{}", status.message());
    assert!(
        status.message().contains("tiny-Q4_0.gguf (Q4_0)"),
        "{}",
        status.message()
    );
    let status = load(&mut admin, "tiny/gguf/absent.gguf").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("absent.gguf"),
        "{}",
        status.message()
    );

    for (reference, field, part) in [
        ("tiny/gguf:Q4 K", "model_id", "quant selector \"Q4 K\""),
        ("tiny/gguf/weights.bin", "model_id", "must end in \".gguf\""),
        ("tiny/gguf/tiny-Q4_0.gguf:Q4_0", "model_id", "not both"),
        ("tiny/gguf@", "revision", "empty"),
    ] {
        let status = load(&mut admin, reference).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{reference}");
        assert!(
            status.message().contains(part),
            "{reference}: {}",
            status.message()
        );
        let details = tonic_types::StatusExt::get_error_details(&status);
        let bad = details.bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, field, "{reference}");
    }
    // A revision in the reference and another in the request.
    let status = admin
        .load_model(pb::LoadModelRequest {
            model_id: "tiny/gguf@main".into(),
            revision: "v2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("names revision \"main\""),
        "{}",
        status.message()
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn download_with_a_selector_fetches_only_that_file_and_the_metadata() {
    let hub = HubServer::start().await;
    let mut files = quants();
    files.insert("README.md", b"# tiny\n".to_vec());
    files.insert("config.json", b"{\"model_type\": \"llama\"}".to_vec());
    hub.add_repo(REPO, C1, &["main"], &files);
    let url = hub.url();
    let server = TestServer::start_with(|c| {
        c.downloads.hub_endpoint = url;
        c.downloads.task.disk_margin = 0;
    })
    .await;
    let mut admin = Admin::new(server.channel().await);
    let mut stream = admin
        .download_model(pb::DownloadModelRequest {
            model_id: "tiny/gguf:q4_0".into(),
            auto_load: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(item) = stream.next().await {
        last = Some(item.unwrap().progress.unwrap());
    }
    let last = last.unwrap();
    assert_eq!(
        last.state(),
        pb::DownloadState::Completed,
        "{}",
        last.error_message
    );
    let fetched: Vec<&str> = last.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(fetched, ["README.md", "config.json", "tiny-Q4_0.gguf"]);
    assert_eq!(hub.bytes_sent(REPO, "tiny-Q8_0.gguf"), 0);
    assert_eq!(hub.bytes_sent(REPO, "tiny-Q4_1.gguf"), 0);
    assert_eq!(
        last.auto_load_state(),
        pb::AutoLoadState::Loaded,
        "{}",
        last.auto_load_message
    );
    let snapshot = server
        .cache_dir()
        .join("models--tiny--gguf/snapshots")
        .join(C1);
    assert!(snapshot.join("tiny-Q4_0.gguf").exists());
    assert!(!snapshot.join("tiny-Q8_0.gguf").exists());
    let models = list(&mut admin).await;
    let loaded = models
        .iter()
        .find(|m| m.state() == pb::ModelState::Loaded)
        .expect("auto-loaded");
    assert_eq!(loaded.model_id, "tiny/gguf:Q4_0");
    assert_eq!(loaded.gguf_file, "tiny-Q4_0.gguf");

    // A selector the repository has no file for: FILE_NOT_FOUND, nothing fetched.
    let mut stream = admin
        .download_model(pb::DownloadModelRequest {
            model_id: "tiny/gguf:Q9_X".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut end = None;
    let mut last = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(m) => last = m.progress,
            Err(status) => end = Some(status),
        }
    }
    let last = last.unwrap();
    assert_eq!(last.error_code(), pb::DownloadErrorCode::FileNotFound);
    assert!(
        last.error_message.contains(":Q9_X"),
        "{}",
        last.error_message
    );
    assert_eq!(end.unwrap().code(), tonic::Code::NotFound);
    server.stop().await.unwrap();
}
