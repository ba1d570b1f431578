//! The `lmx` client subcommands, run as the real binary against the real server (and the
//! hub-protocol test server): pull with progress and exit codes (success, not found, cancel,
//! detach, local, JSON), ls/ps/rm/load/unload, generate, chat, remote verify, and TLS.

mod common;

use std::process::{Output, Stdio};

use common::{
    hub::{Fault, HubServer},
    TestServer,
};
use lmx::{pb, testing};
use tokio::io::AsyncWriteExt;

const C1: &str = "1111111111111111111111111111111111111111";
const WEIGHTS: &str = "model.safetensors";

fn lmx() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_lmx"));
    cmd.env_remove("LMX_SERVER")
        .env_remove("LMX_TOKEN")
        .env_remove("LMX_CACHE_DIR");
    cmd
}

async fn run(server: &TestServer, args: &[&str]) -> Output {
    lmx()
        .args(args)
        .arg("--server")
        .arg(server.addr.to_string())
        .output()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn setup() -> (HubServer, TestServer) {
    let hub = HubServer::start().await;
    hub.add_repo("tiny/llama", C1, &["main"], &testing::tiny_repo("llama", 1));
    let url = hub.url();
    let server = TestServer::start_with(|c| {
        c.downloads.hub_endpoint = url;
        c.downloads.task.disk_margin = 0;
        c.downloads.retry.min_delay = std::time::Duration::from_millis(5);
        c.downloads.retry.attempts = 1;
    })
    .await;
    (hub, server)
}

#[tokio::test]
async fn pull_shows_progress_and_exit_codes_name_the_error() {
    let (_hub, server) = setup().await;
    let out = run(&server, &["pull", "tiny/llama"]).await;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("DOWNLOADING tiny/llama@main"), "{stderr}");
    assert!(
        stderr.contains("COMPLETED tiny/llama@main (commit 111111111111)"),
        "{stderr}"
    );

    let out = run(&server, &["pull", "tiny/absent"]).await;
    assert_eq!(out.status.code(), Some(13), "10 + REPO_NOT_FOUND");
    assert!(
        text(&out.stderr).contains("FAILED tiny/absent@main: REPO_NOT_FOUND"),
        "{}",
        text(&out.stderr)
    );

    let out = run(&server, &["pull", "tiny/llama", "--include", "*.gguf"]).await;
    assert_eq!(out.status.code(), Some(15), "10 + FILE_NOT_FOUND");

    // JSON lines, one per update, the last one terminal.
    let out = run(&server, &["pull", "tiny/llama", "--json"]).await;
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.last().unwrap()["state"], "DOWNLOAD_STATE_COMPLETED");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn repair_fetches_what_is_broken_and_exit_codes_follow_pull() {
    let (hub, server) = setup().await;
    assert!(run(&server, &["pull", "tiny/llama"]).await.status.success());
    let snapshot = server
        .cache_dir()
        .join("models--tiny--llama/snapshots")
        .join(C1);
    let blob = testing::blob_of(&snapshot, WEIGHTS);
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xFF;
    std::fs::write(&blob, bytes).unwrap();
    let before = hub.bytes_sent("tiny/llama", WEIGHTS);

    let out = run(&server, &["repair", "tiny/llama"]).await;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("VERIFYING tiny/llama@main"), "{stderr}");
    assert!(
        stderr.contains("COMPLETED tiny/llama@main (commit 111111111111): repaired 1 file(s)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("model.safetensors (CHECKSUM_MISMATCH)"),
        "{stderr}"
    );
    assert_eq!(
        hub.bytes_sent("tiny/llama", WEIGHTS) - before,
        n as u64,
        "the weights, once"
    );

    // Clean now: nothing to repair; JSON lines carry the summary.
    let out = run(&server, &["repair", "tiny/llama@main", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let last: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "DOWNLOAD_STATE_COMPLETED");
    assert_eq!(last["repaired_files"], serde_json::json!([]));
    assert!(
        last["summary"]
            .as_str()
            .unwrap()
            .starts_with("nothing to repair"),
        "{last}"
    );

    // Unknown model: refused before anything starts.
    let out = run(&server, &["repair", "tiny/absent"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("tiny/absent"),
        "{}",
        text(&out.stderr)
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn run_answers_a_prompt_or_piped_text_and_ls_shows_gguf_files_and_aliases() {
    let server = TestServer::start_with(|c| c.engine.load_on_demand = true).await;
    let cache = server.cache_dir();
    testing::write_hf_cache(
        &cache,
        "tiny/llama",
        C1,
        Some("main"),
        &testing::tiny_repo("llama", 1),
    );
    let mut base = testing::tiny_repo("llama", 4);
    base.remove("tokenizer_config.json");
    testing::write_hf_cache(&cache, "tiny/base", C1, Some("main"), &base);
    let mut quants = testing::RepoFiles::default();
    for (name, dtype) in [
        ("tiny-Q8_0.gguf", candle_core::quantized::GgmlDType::Q8_0),
        ("tiny-Q4_0.gguf", candle_core::quantized::GgmlDType::Q4_0),
    ] {
        quants.insert(name, testing::tiny::spm_llama_gguf_with(1, dtype));
    }
    testing::write_hf_cache(&cache, "tiny/gguf", C1, Some("main"), &quants);
    let sampling = ["--max-tokens", "4", "--temperature", "0"];

    // One-shot: the answer on stdout, then exit 0 (the model loads on demand).
    let mut args = vec!["run", "tiny/llama", "say", "hello"];
    args.extend(sampling);
    let out = run(&server, &args).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answer = text(&out.stdout);
    assert!(
        answer.ends_with('\n') && !answer.trim().is_empty(),
        "{answer:?}"
    );

    // The prompt piped on stdin, a GGUF quant by reference, --verbose stats.
    let mut child = lmx()
        .args(["run", "tiny/gguf@main:q8_0", "--verbose"])
        .args(sampling)
        .args(["--server", &server.addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello there\n").await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("generated tokens"),
        "{}",
        text(&out.stderr)
    );

    // A model without a chat template (Chat refuses it) is completed from the raw prompt.
    let mut args = vec!["run", "tiny/base", "once upon a time"];
    args.extend(sampling);
    let out = run(&server, &args).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut child = lmx()
        .args(["chat", "tiny/base", "--server", &server.addr.to_string()])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hi\n")
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("NO_CHAT_TEMPLATE"),
        "{}",
        text(&out.stderr)
    );

    // No prompt on a terminal: an interactive chat (a pseudo-terminal from util-linux `script`,
    // part of every Debian; skipped elsewhere, except under LMX_REQUIRE_TOOLS=1, as CI runs).
    let have_script = std::path::Path::new("/usr/bin/script").exists();
    assert!(
        have_script || std::env::var("LMX_REQUIRE_TOOLS").map_or(true, |v| v != "1"),
        "LMX_REQUIRE_TOOLS=1 but /usr/bin/script (util-linux) is missing"
    );
    if !have_script {
        eprintln!("skipped the interactive part: no /usr/bin/script");
    }
    if have_script {
        let command = format!(
            "{} run tiny/llama --max-tokens 3 --temperature 0 --server {}",
            env!("CARGO_BIN_EXE_lmx"),
            server.addr
        );
        let mut child = tokio::process::Command::new("/usr/bin/script")
            .args(["-qec", &command, "/dev/null"])
            .env_remove("LMX_SERVER")
            .env_remove("LMX_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hello\n/exit\n").await.unwrap();
        let out = child.wait_with_output().await.unwrap();
        let all = text(&out.stdout) + &text(&out.stderr);
        assert!(out.status.success(), "{all}");
        assert!(all.contains("chatting with tiny/llama"), "{all}");
        drop(stdin);
    }

    // No prompt and nothing piped; an unknown model.
    let out = run(&server, &["run", "tiny/llama"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no prompt"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&server, &["run", "tiny/absent", "hi"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("NotFound"),
        "{}",
        text(&out.stderr)
    );

    // ls: one line per GGUF file with its quant and size, and the aliases.
    let out = run(&server, &["load", "tiny/gguf:Q4_0", "--alias", "small"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("GGUF tiny-Q4_0.gguf [Q4_0]"),
        "{}",
        text(&out.stdout)
    );
    let table = text(&run(&server, &["ls"]).await.stdout);
    assert!(table.starts_with("MODEL"), "{table}");
    assert!(table.lines().next().unwrap().contains("QUANT"), "{table}");
    let line = |id: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("{id} missing: {table}"))
            .to_owned()
    };
    let q4 = line("tiny/gguf:Q4_0");
    assert!(
        q4.contains("LOADED") && q4.contains("Q4_0") && q4.contains("small"),
        "{q4}"
    );
    let size =
        indicatif::HumanBytes(quants.get("tiny-Q4_0.gguf").unwrap().len() as u64).to_string();
    assert!(q4.contains(&size), "{q4} lacks {size}");
    let q8 = line("tiny/gguf:Q8_0");
    assert!(q8.contains("LOADED") && q8.contains("Q8_0"), "{q8}");
    let json: serde_json::Value =
        serde_json::from_slice(&run(&server, &["ls", "--json"]).await.stdout).unwrap();
    let entry = json
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model_id"] == "tiny/gguf:Q4_0")
        .unwrap();
    assert_eq!(entry["quantization"], "Q4_0");
    assert_eq!(entry["gguf_file"], "tiny-Q4_0.gguf");
    assert_eq!(entry["aliases"], serde_json::json!(["small"]));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ctrl_c_cancels_the_pull_on_the_server_or_detaches() {
    let (hub, server) = setup().await;
    hub.inject(Fault::Hold {
        path: WEIGHTS.into(),
        after: 50_000,
        times: 1,
    });
    let child = lmx()
        .args(["pull", "tiny/llama", "--server", &server.addr.to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    hub.wait_held(WEIGHTS).await;
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(12),
        "10 + DOWNLOAD_CANCELLED: {stderr}"
    );
    assert!(stderr.contains("CANCELLED tiny/llama@main"), "{stderr}");
    assert!(stderr.contains("DOWNLOAD_CANCELLED"), "{stderr}");
    hub.release();

    // --detach: the download goes on without the CLI.
    hub.inject(Fault::Hold {
        path: WEIGHTS.into(),
        after: 60_000,
        times: 1,
    });
    let child = lmx()
        .args([
            "pull",
            "tiny/llama",
            "--detach",
            "--server",
            &server.addr.to_string(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    hub.wait_held(WEIGHTS).await;
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("detached"));
    hub.release();
    let mut admin = pb::model_admin_client::ModelAdminClient::new(server.channel().await);
    let id = admin
        .list_downloads(pb::ListDownloadsRequest {})
        .await
        .unwrap()
        .into_inner()
        .downloads[0]
        .download_id
        .clone();
    let mut watch = admin
        .watch_download(pb::WatchDownloadRequest { download_id: id })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(item) = tokio_stream::StreamExt::next(&mut watch).await {
        last = item.unwrap().progress;
    }
    assert_eq!(last.unwrap().state(), pb::DownloadState::Completed);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn pull_local_needs_no_server() {
    let hub = HubServer::start().await;
    hub.add_repo("tiny/llama", C1, &["main"], &testing::tiny_repo("llama", 1));
    let cache = tempfile::tempdir().unwrap();
    let out = lmx()
        .args([
            "pull",
            "tiny/llama",
            "--local",
            "--hub-endpoint",
            &hub.url(),
            "--cache-dir",
        ])
        .arg(cache.path())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(cache
        .path()
        .join("models--tiny--llama/snapshots")
        .join(C1)
        .join(WEIGHTS)
        .exists());
    // And the offline verify agrees.
    let out = lmx()
        .args(["verify", "tiny/llama", "--cache-dir"])
        .arg(cache.path())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stdout));
}

#[tokio::test]
async fn catalog_commands_load_generate_chat_and_remove() {
    let (_hub, server) = setup().await;
    assert!(run(&server, &["pull", "tiny/llama"]).await.status.success());

    let out = run(&server, &["ls", "--json"]).await;
    let models: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(models[0]["model_id"], "tiny/llama");
    assert_eq!(models[0]["state"], "AVAILABLE");
    let table = text(&run(&server, &["ls"]).await.stdout);
    assert!(table.starts_with("MODEL"), "{table}");
    assert!(table.contains("tiny/llama  main"), "{table}");

    let out = run(&server, &["load", "tiny/llama"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("loaded tiny/llama (llama, SAFETENSORS"));
    let ps: serde_json::Value =
        serde_json::from_slice(&run(&server, &["ps", "--json"]).await.stdout).unwrap();
    assert_eq!(ps[0]["state"], "LOADED");

    let out = run(
        &server,
        &[
            "generate",
            "tiny/llama",
            "hello",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("[5 prompt + "),
        "{}",
        text(&out.stderr)
    );
    let out = run(
        &server,
        &[
            "generate",
            "tiny/llama",
            "hello",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--json",
        ],
    )
    .await;
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines[0].get("token").is_some());
    assert!(lines.last().unwrap().get("completion").is_some());
    let bad = run(
        &server,
        &["generate", "tiny/llama", "hello", "--max-tokens", "0"],
    )
    .await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("`max_tokens` must be >= 1"),
        "{}",
        text(&bad.stderr)
    );

    let mut child = lmx()
        .args([
            "chat",
            "tiny/llama",
            "--max-tokens",
            "3",
            "--temperature",
            "0",
            "--server",
            &server.addr.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"hi there\nand again\n/exit\n")
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stats: Vec<&str> = text(&out.stderr)
        .leak()
        .lines()
        .filter(|l| l.contains("prompt + "))
        .collect();
    assert_eq!(stats.len(), 2, "two turns");
    let first: u32 = stats[0]
        .trim_start_matches('[')
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let second: u32 = stats[1]
        .trim_start_matches('[')
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        second > first,
        "the history is kept: {first} then {second} prompt tokens"
    );

    let out = run(&server, &["verify", "tiny/llama", "--json", "--full"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["complete"], true);
    assert_eq!(report["mode"], "FULL");

    let refused = run(&server, &["rm", "tiny/llama"]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stderr).contains("MODEL_LOADED"));
    assert!(run(&server, &["unload", "tiny/llama"])
        .await
        .status
        .success());
    let out = run(&server, &["rm", "tiny/llama"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let models: serde_json::Value =
        serde_json::from_slice(&run(&server, &["ls", "--json"]).await.stdout).unwrap();
    assert_eq!(models.as_array().unwrap().len(), 0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_cli_speaks_tls_and_tokens() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let server = TestServer::start_with(|c| {
        c.tls = Some(lmx::server::TlsFiles {
            cert: cert.pem().into_bytes(),
            key: lmx::secret::Secret::new(key.serialize_pem()),
            client_ca: None,
        });
        c.tokens.admin = Some(lmx::secret::Secret::new("cli-admin"));
    })
    .await;
    let ls = |token: Option<&'static str>| {
        let mut cmd = lmx();
        cmd.args([
            "ls",
            "--server",
            &server.addr.to_string(),
            "--tls-domain",
            "localhost",
            "--tls-ca",
        ])
        .arg(dir.path().join("ca.pem"));
        if let Some(t) = token {
            cmd.env("LMX_TOKEN", t);
        }
        cmd.output()
    };
    let out = ls(Some("cli-admin")).await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ls(None).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Unauthenticated"),
        "{}",
        text(&out.stderr)
    );
    server.stop().await.unwrap();
}
