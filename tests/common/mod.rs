//! Shared test harness: starts the real lmx server in-process on 127.0.0.1:0 and hands out gRPC
//! channels to it. No fixed ports, no sleeps: the listener is bound before the server runs, so a
//! client can connect at once.

#![allow(dead_code)]

pub mod hub;
pub mod models;
pub mod tools;

use std::{net::SocketAddr, path::Path};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

/// A running server and what it needs to stop.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The metrics listener, when started with [`TestServer::start_with_metrics`].
    pub metrics_addr: Option<SocketAddr>,
    pub cache: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    /// Starts a server with default configuration and an empty cache folder.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `configure` adjusted the default configuration.
    pub async fn start_with(configure: impl FnOnce(&mut lmx::Config)) -> Self {
        Self::start_inner(configure, false).await
    }

    /// Like [`TestServer::start_with`], with a metrics listener on 127.0.0.1:0.
    pub async fn start_with_metrics(configure: impl FnOnce(&mut lmx::Config)) -> Self {
        Self::start_inner(configure, true).await
    }

    async fn start_inner(configure: impl FnOnce(&mut lmx::Config), metrics: bool) -> Self {
        let cache = tempfile::tempdir().expect("temp cache dir");
        let mut config = lmx::Config::new(cache.path().join("hub"));
        config.model_roots = test_model_roots();
        configure(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = rx.await;
        };
        let (task, metrics_addr) = if metrics {
            let metrics_listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind metrics");
            let metrics_addr = metrics_listener.local_addr().unwrap();
            (
                tokio::spawn(lmx::run_with_metrics(
                    config,
                    listener,
                    metrics_listener,
                    shutdown,
                )),
                Some(metrics_addr),
            )
        } else {
            (tokio::spawn(lmx::run(config, listener, shutdown)), None)
        };
        Self {
            addr,
            metrics_addr,
            cache,
            shutdown: Some(tx),
            task,
        }
    }

    /// The cache folder the server uses.
    pub fn cache_dir(&self) -> std::path::PathBuf {
        self.cache.path().join("hub")
    }

    /// A new connection to the server.
    pub async fn channel(&self) -> Channel {
        connect(self.addr).await
    }

    /// "http://127.0.0.1:PORT".
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Triggers the graceful shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.expect("server task panicked")
    }
}

/// The model roots test servers allow by default: tests build model folders under the temp
/// folder and read the real models from `.cache/models`. Tests of the rule itself clear them.
pub fn test_model_roots() -> Vec<std::path::PathBuf> {
    [std::env::temp_dir(), models::models_dir()]
        .into_iter()
        .filter(|d| d.is_dir())
        .collect()
}

/// A gRPC channel to `addr`.
pub async fn connect(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the test server")
}

/// The repository root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The real `lmx serve` binary, started by [`spawn_serve`].
pub struct Spawned {
    pub child: tokio::process::Child,
    /// The address it logged it listens on.
    pub addr: SocketAddr,
    /// Its log (JSON lines), collected in the background.
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

/// Starts `lmx serve --log-format json <args>` (debug logging) and waits for the line that
/// names its address; keeps reading its log so it never blocks on a full pipe.
pub async fn spawn_serve(args: &[&str]) -> Spawned {
    spawn_serve_with_env(args, &[]).await
}

/// [`spawn_serve`] with extra environment variables (`LMX_NATIVE=0`, ...).
pub async fn spawn_serve_with_env(args: &[&str], env: &[(&str, &str)]) -> Spawned {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lmx"))
        .args(["serve", "--log-format", "json"])
        .args(args)
        .env("LMX_LOG", "debug")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn lmx");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("lmx exited before listening");
        log.lock().unwrap().push_str(&line);
        let event = serde_json::from_str::<serde_json::Value>(&line).ok();
        if let Some(addr) = event
            .as_ref()
            .and_then(|v| v.get("local_addr"))
            .and_then(|a| a.as_str())
        {
            break addr.parse().unwrap();
        }
    };
    let collected = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = collected.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    Spawned { child, addr, log }
}

/// LoadModel of `model_id` with `options`; the reply.
pub async fn load_model(
    admin: &mut lmx::pb::model_admin_client::ModelAdminClient<Channel>,
    model_id: &str,
    options: Option<lmx::pb::LoadOptions>,
) -> Result<lmx::pb::LoadModelResponse, tonic::Status> {
    admin
        .load_model(lmx::pb::LoadModelRequest {
            model_id: model_id.into(),
            revision: String::new(),
            options,
            alias: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

/// A greedy Generate of 6 tokens after "Hello"; the completion's text.
pub async fn greedy_text(
    inference: &mut lmx::pb::inference_client::InferenceClient<Channel>,
    model_id: &str,
) -> Result<String, tonic::Status> {
    use tokio_stream::StreamExt;
    let mut stream = inference
        .generate(lmx::pb::GenerateRequest {
            model_id: model_id.into(),
            prompt: "Hello".into(),
            parameters: Some(lmx::pb::GenerationParameters {
                max_tokens: Some(6),
                temperature: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(item) = stream.next().await {
        if let Some(lmx::pb::generate_response::Item::Completion(c)) = item?.item {
            return Ok(c.text);
        }
    }
    panic!("the stream ended without a completion");
}
