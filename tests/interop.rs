//! A client in another language against our .proto files: grpcurl (reflection only, no protos)
//! and a Python grpcio client generated from proto/ at test time.

mod common;

use common::{repo_root, tools, TestServer};
use tokio::process::Command;

async fn run(cmd: &mut Command) -> String {
    let out = cmd.output().await.expect("run external tool");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn grpcurl_lists_describes_and_checks_health_through_reflection() {
    let Some(venv) = tools::venv() else { return };
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let grpcurl = || {
        let mut cmd = Command::new(venv.join("bin/grpcurl"));
        cmd.arg("-plaintext");
        cmd
    };

    let list = run(grpcurl().args([&addr, "list"])).await;
    for service in [
        "lmx.v1.ModelAdmin",
        "lmx.v1.Inference",
        "grpc.health.v1.Health",
    ] {
        assert!(
            list.lines().any(|l| l.trim() == service),
            "{service} not in:\n{list}"
        );
    }

    let describe = run(grpcurl().args([&addr, "describe", "lmx.v1.ModelAdmin"])).await;
    for rpc in [
        "DownloadModel",
        "WatchDownload",
        "CancelDownload",
        "VerifyModel",
        "DeleteModel",
        "RepairModel",
    ] {
        assert!(
            describe.contains(&format!("rpc {rpc}")),
            "{rpc} not in:\n{describe}"
        );
    }
    let message = run(grpcurl().args([&addr, "describe", "lmx.v1.DownloadProgress"])).await;
    assert!(
        message.contains(".google.protobuf.Timestamp started_at"),
        "{message}"
    );

    let health = |service: &str| {
        let body = format!(r#"{{"service":"{service}"}}"#);
        let mut cmd = grpcurl();
        cmd.args(["-d", &body, &addr, "grpc.health.v1.Health/Check"]);
        cmd
    };
    assert!(run(&mut health("")).await.contains("\"SERVING\""));
    assert!(run(&mut health("lmx.v1.Inference"))
        .await
        .contains("\"NOT_SERVING\""));

    server.stop().await.unwrap();
}

#[tokio::test]
async fn python_grpcio_client_generated_from_our_protos() {
    let Some(venv) = tools::venv() else { return };
    let server = TestServer::start().await;
    let out = tempfile::tempdir().unwrap();
    let stdout = run(Command::new(venv.join("bin/python"))
        .arg(repo_root().join("tests/interop/client.py"))
        .args(["--target", &server.addr.to_string()])
        .arg("--proto-dir")
        .arg(repo_root().join("proto"))
        .arg("--out")
        .arg(out.path()))
    .await;
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON report");

    assert_eq!(report["health"][""], "SERVING");
    assert_eq!(report["health"]["lmx.v1.ModelAdmin"], "SERVING");
    assert_eq!(report["health"]["lmx.v1.Inference"], "NOT_SERVING");
    let call = |name: &str, field: &str| report["calls"][name][field].clone();
    assert_eq!(call("ListModels", "code"), "OK", "{report}");
    assert_eq!(call("ListModels", "models"), 0, "{report}");
    assert_eq!(
        call("DownloadModel", "code"),
        "INVALID_ARGUMENT",
        "{report}"
    );
    assert_eq!(
        call("DownloadModel", "reason"),
        "INVALID_ARGUMENT",
        "{report}"
    );
    assert_eq!(call("Generate", "code"), "NOT_FOUND", "{report}");
    assert_eq!(call("Generate", "reason"), "MODEL_NOT_FOUND", "{report}");
    assert_eq!(call("Generate", "domain"), "lmx.v1", "{report}");
    assert_eq!(call("VerifyModel", "code"), "NOT_FOUND", "{report}");
    assert_eq!(call("VerifyModel", "reason"), "MODEL_NOT_FOUND", "{report}");
    assert_eq!(
        report["enums"]["DOWNLOAD_ERROR_CODE_INCOMPLETE_DOWNLOAD"],
        1
    );
    server.stop().await.unwrap();
}

/// Reflection serves google.rpc's descriptors, so grpcurl prints an error's details decoded:
/// the ErrorInfo's `reason` and the BadRequest's field, not an opaque Any.
#[tokio::test]
async fn grpcurl_prints_error_details_decoded_through_reflection() {
    let Some(venv) = tools::venv() else { return };
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let out = Command::new(venv.join("bin/grpcurl"))
        .args([
            "-plaintext",
            "-d",
            r#"{"model_id":"no/such-model","prompt":"x"}"#,
        ])
        .args([&addr, "lmx.v1.Inference/Generate"])
        .output()
        .await
        .expect("run grpcurl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .replace([' ', '\t'], "");
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("NotFound"), "{text}");
    assert!(
        text.contains(r#""@type":"type.googleapis.com/google.rpc.ErrorInfo""#),
        "{text}"
    );
    assert!(text.contains(r#""reason":"MODEL_NOT_FOUND""#), "{text}");
    assert!(text.contains(r#""domain":"lmx.v1""#), "{text}");

    let bad = Command::new(venv.join("bin/grpcurl"))
        .args(["-plaintext", "-d", r#"{"model_id":""}"#])
        .args([&addr, "lmx.v1.ModelAdmin/DownloadModel"])
        .output()
        .await
        .expect("run grpcurl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&bad.stdout),
        String::from_utf8_lossy(&bad.stderr)
    )
    .replace([' ', '\t'], "");
    assert!(text.contains("InvalidArgument"), "{text}");
    assert!(
        text.contains(r#""@type":"type.googleapis.com/google.rpc.BadRequest""#),
        "{text}"
    );
    assert!(text.contains(r#""reason":"INVALID_ARGUMENT""#), "{text}");
    server.stop().await.unwrap();
}
