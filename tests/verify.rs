//! Snapshot verification end to end: VerifyModel over gRPC against the real server, and the
//! offline `lmx verify` command, on complete and incomplete snapshots in an HF-layout cache.

mod common;

use std::process::Command;

use common::TestServer;
use lmx::{pb, testing};
use tonic::Code;
use tonic_types::StatusExt;

const COMMIT: &str = "1111111111111111111111111111111111111111";

fn complete_repo() -> testing::RepoFiles {
    testing::sharded_safetensors_repo(3, 64)
}

fn incomplete_repo() -> testing::RepoFiles {
    let mut files = complete_repo();
    files.remove("model-00002-of-00003.safetensors");
    files
}

async fn verify(
    client: &mut pb::model_admin_client::ModelAdminClient<tonic::transport::Channel>,
    model_id: &str,
    mode: pb::VerifyMode,
) -> Result<pb::VerifyModelResponse, tonic::Status> {
    client
        .verify_model(pb::VerifyModelRequest {
            model_id: model_id.into(),
            revision: String::new(),
            mode: mode as i32,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn verify_model_over_grpc_reports_complete_and_incomplete_snapshots() {
    let server = TestServer::start().await;
    testing::write_hf_cache(
        &server.cache_dir(),
        "org/good",
        COMMIT,
        Some("main"),
        &complete_repo(),
    );
    testing::write_hf_cache(
        &server.cache_dir(),
        "org/bad",
        COMMIT,
        Some("main"),
        &incomplete_repo(),
    );
    let mut client = pb::model_admin_client::ModelAdminClient::new(server.channel().await);

    for mode in [pb::VerifyMode::Quick, pb::VerifyMode::Full] {
        let good = verify(&mut client, "org/good", mode).await.unwrap();
        assert!(good.complete, "{good:?}");
        assert!(good.problems.is_empty());
        assert_eq!(good.commit_sha, COMMIT);
        assert_eq!(good.format(), pb::WeightFormat::Safetensors);
        assert_eq!(good.architecture, "llama");
        assert_eq!(good.mode(), mode);
        assert_eq!(good.files_checked, 6);
        assert_eq!(good.bytes_hashed > 0, mode == pb::VerifyMode::Full);
    }

    let bad = verify(&mut client, "org/bad", pb::VerifyMode::Quick)
        .await
        .unwrap();
    assert!(!bad.complete);
    assert_eq!(bad.problems.len(), 1, "{:?}", bad.problems);
    let problem = &bad.problems[0];
    assert_eq!(problem.kind(), pb::SnapshotProblemKind::MissingIndexedFile);
    assert_eq!(problem.severity(), pb::ProblemSeverity::Error);
    assert_eq!(problem.file, "model-00002-of-00003.safetensors");
    assert!(
        bad.summary.contains("1 of 3 files referenced"),
        "{}",
        bad.summary
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn verify_model_full_mode_finds_corrupt_blobs() {
    let server = TestServer::start().await;
    let snapshot = testing::write_hf_cache(
        &server.cache_dir(),
        "org/m",
        COMMIT,
        Some("main"),
        &complete_repo(),
    );
    let blob = testing::blob_of(&snapshot, "model-00003-of-00003.safetensors");
    let mut bytes = std::fs::read(&blob).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let mut client = pb::model_admin_client::ModelAdminClient::new(server.channel().await);

    assert!(
        verify(&mut client, "org/m", pb::VerifyMode::Quick)
            .await
            .unwrap()
            .complete
    );
    let full = verify(&mut client, "org/m", pb::VerifyMode::Full)
        .await
        .unwrap();
    assert!(!full.complete);
    assert_eq!(
        full.problems[0].kind(),
        pb::SnapshotProblemKind::ChecksumMismatch
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn verify_model_errors_name_the_field_and_use_stable_reasons() {
    let server = TestServer::start().await;
    testing::write_hf_cache(
        &server.cache_dir(),
        "org/m",
        COMMIT,
        Some("main"),
        &complete_repo(),
    );
    let mut client = pb::model_admin_client::ModelAdminClient::new(server.channel().await);

    let cases = [
        ("org/missing", "", Code::NotFound, "MODEL_NOT_FOUND"),
        ("org/m", "dev", Code::NotFound, "REVISION_NOT_FOUND"),
        ("../etc", "", Code::InvalidArgument, "INVALID_ARGUMENT"),
        (
            "org/m",
            "../../x",
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        // Outside the model roots: refused before the file system is asked.
        (
            "/nonexistent/folder",
            "",
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        ),
    ];
    let missing_in_root = server.cache_dir().join("no-such-folder");
    let missing_in_root = missing_in_root.to_str().unwrap();
    let cases = cases
        .into_iter()
        .chain([(missing_in_root, "", Code::NotFound, "MODEL_NOT_FOUND")]);
    for (model_id, revision, code, reason) in cases {
        let status = client
            .verify_model(pb::VerifyModelRequest {
                model_id: model_id.into(),
                revision: revision.into(),
                mode: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{model_id}@{revision}: {status:?}");
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            reason,
            "{model_id}"
        );
    }
    let status = client
        .verify_model(pb::VerifyModelRequest {
            model_id: "org/m".into(),
            revision: String::new(),
            mode: 42,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("`mode`") && status.message().contains("42"),
        "{}",
        status.message()
    );
    let bad = status.get_details_bad_request().unwrap();
    assert_eq!(bad.field_violations[0].field, "mode");
    server.stop().await.unwrap();
}

fn lmx_verify(cache: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lmx"))
        .arg("verify")
        .args(args)
        .arg("--cache-dir")
        .arg(cache)
        .env_remove("LMX_CACHE_DIR")
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn lmx_verify_exit_codes_and_json_report() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    testing::write_hf_cache(&cache, "org/good", COMMIT, Some("main"), &complete_repo());
    let bad_snapshot =
        testing::write_hf_cache(&cache, "org/bad", COMMIT, Some("main"), &incomplete_repo());

    let (code, stdout, _) = lmx_verify(&cache, &["org/good", "--json"]);
    assert_eq!(code, 0, "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["complete"], true);
    assert_eq!(json["commit"], COMMIT);
    assert_eq!(json["format"], "SAFETENSORS");
    assert_eq!(json["problems"].as_array().unwrap().len(), 0);

    let (code, stdout, _) = lmx_verify(&cache, &["org/bad", "--json", "--full"]);
    assert_eq!(code, 1, "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["complete"], false);
    assert_eq!(json["mode"], "FULL");
    assert_eq!(json["problems"][0]["kind"], "MISSING_INDEXED_FILE");
    assert_eq!(
        json["problems"][0]["file"],
        "model-00002-of-00003.safetensors"
    );
    assert_eq!(json["problems"][0]["severity"], "error");

    // A folder path works the same, and the table names the problem.
    let (code, stdout, _) = lmx_verify(&cache, &[bad_snapshot.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stdout.contains("MISSING_INDEXED_FILE"), "{stdout}");
    assert!(stdout.contains("incomplete: 1 error"), "{stdout}");

    // The check cannot run: exit 2 with a message.
    let (code, _, stderr) = lmx_verify(&cache, &["org/nothing"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("not in the cache"), "{stderr}");
    let (code, _, stderr) = lmx_verify(&cache, &["org/good", "--revision", "nope"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("known refs: main"), "{stderr}");
}
