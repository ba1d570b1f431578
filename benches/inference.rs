//! Inference figures for SmolLM2-135M-Instruct in f32 (a bench binary:
//! `cargo bench --bench inference`; needs `scripts/test-env.sh` to have fetched the model).
//!
//! The same greedy generation (a fixed prompt, 64 new tokens) measured, in the same run:
//! 1. in-process, through the engine API;
//! 2. through gRPC against the real server on loopback (ratio to 1 = the gRPC overhead);
//! 3. with the `transformers` reference on the same weights, when a Python with torch and
//!    transformers is available (LMX_BENCH_PYTHON, else python3): ratio lmx / transformers.
//!
//! Printed: time to first token, prompt tokens per second (prompt / TTFT) and decode tokens per
//! second, medians of several runs.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lmx::{
    engine::{self, Engine, LoadOptions, Prompt, RawParams, StreamEvent},
    pb,
};
use tokio_stream::StreamExt;

const NEW_TOKENS: i32 = 64;
const RUNS: usize = 5;
const PROMPT: &str = "Large language models are neural networks trained on vast amounts of text. \
They predict the next token given the previous ones, and by repeating that prediction they can \
write essays, answer questions, translate between languages and produce computer programs. \
Serving them efficiently requires careful management of memory, batching of requests and \
attention to latency. In this short essay we explain how a model server works, step by step:";

#[derive(Debug, Clone, Copy)]
struct Figures {
    ttft: Duration,
    prompt_tps: f64,
    decode_tps: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn summarize(samples: &[(Duration, f64)], prompt_tokens: usize) -> Figures {
    let ttft = median(samples.iter().map(|s| s.0.as_secs_f64()).collect());
    Figures {
        ttft: Duration::from_secs_f64(ttft),
        prompt_tps: prompt_tokens as f64 / ttft,
        decode_tps: median(samples.iter().map(|s| s.1).collect()),
    }
}

fn params() -> RawParams {
    RawParams {
        max_tokens: Some(NEW_TOKENS),
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// One in-process generation: (time to first token, decode tokens per second).
fn in_process(engine: &dyn Engine) -> (Duration, f64) {
    let start = Instant::now();
    let mut rx = engine
        .generate(
            Prompt::Text {
                text: PROMPT.into(),
                add_special_tokens: false,
            },
            &params(),
        )
        .expect("generate");
    let (mut first, mut count) = (None, 0);
    loop {
        match rx.blocking_recv().expect("completion") {
            StreamEvent::Token(_) => {
                first.get_or_insert_with(Instant::now);
                count += 1;
            }
            StreamEvent::Done(_) => break,
            StreamEvent::Failed(e) => panic!("{e}"),
        }
    }
    let first = first.expect("a token");
    let decode = (count - 1) as f64 / first.elapsed().as_secs_f64();
    (first - start, decode)
}

/// One generation through gRPC, timed by the client.
async fn over_grpc(
    client: &mut pb::inference_client::InferenceClient<tonic::transport::Channel>,
    model_id: &str,
) -> (Duration, f64) {
    let start = Instant::now();
    let mut stream = client
        .generate(pb::GenerateRequest {
            model_id: model_id.into(),
            revision: String::new(),
            prompt: PROMPT.into(),
            parameters: Some(pb::GenerationParameters {
                max_tokens: Some(NEW_TOKENS),
                temperature: Some(0.0),
                ..Default::default()
            }),
            add_special_tokens: false,
        })
        .await
        .expect("generate")
        .into_inner();
    let (mut first, mut count) = (None, 0);
    while let Some(item) = stream.next().await {
        if let Some(pb::generate_response::Item::Token(_)) = item.expect("item").item {
            first.get_or_insert_with(Instant::now);
            count += 1;
        }
    }
    let first = first.expect("a token");
    let decode = (count - 1) as f64 / first.elapsed().as_secs_f64();
    (first - start, decode)
}

fn transformers(python: &str, model: &Path, prompt_ids: &[u32]) -> Option<(Figures, String)> {
    let ids = serde_json::to_string(prompt_ids).ok()?;
    let out = std::process::Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_transformers.py"))
        .arg(model)
        .arg(ids)
        .arg(NEW_TOKENS.to_string())
        .arg(RUNS.to_string())
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "transformers reference not run: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((
        Figures {
            ttft: Duration::from_secs_f64(v["ttft_s"].as_f64()?),
            prompt_tps: v["prompt_tps"].as_f64()?,
            decode_tps: v["decode_tps"].as_f64()?,
        },
        v["torch"].as_str().unwrap_or("?").to_owned(),
    ))
}

fn print(name: &str, f: Figures) {
    println!(
        "  {name:<28} TTFT {:>8.1} ms   prompt {:>8.1} tok/s   decode {:>6.1} tok/s",
        f.ttft.as_secs_f64() * 1e3,
        f.prompt_tps,
        f.decode_tps
    );
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let models = std::env::var_os("LMX_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache/models"));
    let gguf = models.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        eprintln!(
            "{} is missing: run scripts/test-env.sh first",
            gguf.display()
        );
        std::process::exit(2);
    }
    let dir = lmx::testing::convert::gguf_llama_to_hf_once(
        &gguf,
        &models.join("smollm2-hf-f32-3shards"),
        3,
    )
    .expect("convert");

    let engine = engine::load(&dir, &LoadOptions::default(), Box::new(())).expect("load");
    let prompt_ids: Vec<u32> = engine
        .tokenize(PROMPT, false)
        .expect("tokenize")
        .iter()
        .map(|t| t.id)
        .collect();
    in_process(engine.as_ref());
    let local = summarize(
        &(0..RUNS)
            .map(|_| in_process(engine.as_ref()))
            .collect::<Vec<_>>(),
        prompt_ids.len(),
    );
    drop(engine);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let grpc = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let cache = tempfile::tempdir().unwrap();
        let server = tokio::spawn(lmx::run(lmx::Config::new(cache.path()), listener, async {
            let _ = stopped.await;
        }));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let model_id = dir.to_str().unwrap().to_owned();
        pb::model_admin_client::ModelAdminClient::new(channel.clone())
            .load_model(pb::LoadModelRequest {
                model_id: model_id.clone(),
                revision: String::new(),
                options: None,
            })
            .await
            .expect("load over gRPC");
        let mut client = pb::inference_client::InferenceClient::new(channel);
        over_grpc(&mut client, &model_id).await;
        let mut samples = Vec::new();
        for _ in 0..RUNS {
            samples.push(over_grpc(&mut client, &model_id).await);
        }
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        summarize(&samples, prompt_ids.len())
    });

    println!(
        "SmolLM2-135M-Instruct f32, {} prompt tokens, {NEW_TOKENS} new tokens greedy, median of {RUNS} ({} threads)",
        prompt_ids.len(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    print("lmx in-process", local);
    print("lmx through gRPC", grpc);
    println!(
        "  gRPC / in-process:           TTFT x{:.3}   decode x{:.3}",
        grpc.ttft.as_secs_f64() / local.ttft.as_secs_f64(),
        grpc.decode_tps / local.decode_tps
    );
    let python = std::env::var("LMX_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    match transformers(&python, &dir, &prompt_ids) {
        Some((reference, torch)) => {
            print(&format!("transformers (torch {torch})"), reference);
            println!(
                "  lmx / transformers:          prompt x{:.2}   decode x{:.2}   TTFT x{:.2}",
                local.prompt_tps / reference.prompt_tps,
                local.decode_tps / reference.decode_tps,
                local.ttft.as_secs_f64() / reference.ttft.as_secs_f64()
            );
        }
        None => println!("  transformers: not installed for {python} (set LMX_BENCH_PYTHON); no reference figures"),
    }
}
