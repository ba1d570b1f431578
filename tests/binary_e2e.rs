//! The real `lmx serve` binary driven by grpcurl (reflection only) and the `lmx` CLI binary:
//! RepairModel of a corrupt blob, GGUF references (DownloadModel with a quant selector, LoadModel
//! with a file selector, a selector that names nothing), and `lmx run` / `lmx ls` / `lmx repair`
//! against it.

mod common;

use common::{hub::HubServer, tools};
use lmx::testing;
use tokio::process::Command;

const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn the_real_binary_repairs_and_serves_gguf_references_over_grpcurl_and_the_cli() {
    let Some(venv) = tools::venv() else { return };
    let hub = HubServer::start().await;
    hub.add_repo("tiny/llama", C1, &["main"], &testing::tiny_repo("llama", 1));
    let mut quants = testing::RepoFiles::default();
    for (name, dtype) in [
        ("tiny-Q8_0.gguf", candle_core::quantized::GgmlDType::Q8_0),
        ("tiny-Q4_0.gguf", candle_core::quantized::GgmlDType::Q4_0),
    ] {
        quants.insert(name, testing::tiny::spm_llama_gguf_with(2, dtype));
    }
    quants.insert("README.md", b"# tiny quants\n".to_vec());
    hub.add_repo("tiny/gguf", C2, &["main"], &quants);

    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let url = hub.url();
    let serve = common::spawn_serve(&[
        "--listen",
        "127.0.0.1:0",
        "--hub-endpoint",
        &url,
        "--download-retry-delay",
        "10ms",
        "--disk-margin",
        "0",
        "--cache-dir",
        cache.to_str().unwrap(),
    ])
    .await;
    let addr = serve.addr.to_string();
    // A call that must succeed: its stdout.
    let grpcurl = |body: &str, method: &str| {
        let mut cmd = Command::new(venv.join("bin/grpcurl"));
        cmd.args(["-plaintext", "-d", body, &addr, method]);
        async move {
            let out = cmd.output().await.unwrap();
            let stdout = text(&out.stdout);
            assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
            stdout
        }
    };
    let lmx = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lmx"));
        cmd.args(args).args(["--server", &addr]);
        cmd.env_remove("LMX_SERVER").env_remove("LMX_TOKEN");
        cmd
    };

    // Pull, corrupt a blob (same size), repair through grpcurl.
    let out = lmx(&["pull", "tiny/llama"]).output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let snapshot = cache.join("models--tiny--llama/snapshots").join(C1);
    let blob = testing::blob_of(&snapshot, "model.safetensors");
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();
    let stdout = grpcurl(
        r#"{"model_id":"tiny/llama"}"#,
        "lmx.v1.ModelAdmin/RepairModel",
    )
    .await;
    assert!(stdout.contains("DOWNLOAD_STATE_COMPLETED"), "{stdout}");
    assert!(stdout.contains("\"repairedFiles\": [\n"), "{stdout}");
    assert!(stdout.contains("\"model.safetensors\""), "{stdout}");
    assert!(stdout.contains("repaired 1 file(s)"), "{stdout}");
    // And the CLI sees it clean now.
    let out = lmx(&["repair", "tiny/llama"]).output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("nothing to repair"),
        "{}",
        text(&out.stderr)
    );

    // GGUF: one quant pulled by reference, then loaded by file name.
    let stdout = grpcurl(
        r#"{"model_id":"tiny/gguf:q4_0"}"#,
        "lmx.v1.ModelAdmin/DownloadModel",
    )
    .await;
    assert!(stdout.contains("DOWNLOAD_STATE_COMPLETED"), "{stdout}");
    assert!(!stdout.contains("tiny-Q8_0.gguf"), "{stdout}");
    assert_eq!(hub.bytes_sent("tiny/gguf", "tiny-Q8_0.gguf"), 0);
    let stdout = grpcurl(
        r#"{"model_id":"tiny/gguf/tiny-Q4_0.gguf@main"}"#,
        "lmx.v1.ModelAdmin/LoadModel",
    )
    .await;
    assert!(
        stdout.contains("\"ggufFile\": \"tiny-Q4_0.gguf\""),
        "{stdout}"
    );
    assert!(stdout.contains("\"quantization\": \"Q4_0\""), "{stdout}");

    // A selector that names no file: NOT_FOUND, the reason decoded through reflection.
    let out = Command::new(venv.join("bin/grpcurl"))
        .args([
            "-plaintext",
            "-v",
            "-d",
            r#"{"model_id":"tiny/gguf:Q8_0"}"#,
            &addr,
        ])
        .arg("lmx.v1.ModelAdmin/LoadModel")
        .output()
        .await
        .unwrap();
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(!out.status.success());
    assert!(all.contains("Code: NotFound"), "{all}");
    assert!(all.contains("GGUF_FILE_NOT_FOUND"), "{all}");

    // lmx run on the default choice (loaded on demand), lmx ls with the quant column.
    let out = lmx(&[
        "run",
        "tiny/gguf",
        "hello",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
    ])
    .output()
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = lmx(&["ls"]).output().await.unwrap();
    let table = text(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("tiny/gguf ") && l.contains("Q4_0") && l.contains("LOADED")),
        "{table}"
    );
}
