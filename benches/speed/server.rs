//! lmx through gRPC: the real `lmx serve` binary as a separate process on 127.0.0.1:0, so that
//! its own CPU time can be read from /proc while it sits idle with a model loaded.
//!
//! The client runs on a current-thread runtime: one thread, so it takes as little as possible
//! from the cores the server computes on.

use std::{
    io::BufRead,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use lmx::pb;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::measure::Sample;

pub struct Server {
    child: Child,
    runtime: tokio::runtime::Runtime,
    channel: Channel,
}

impl Server {
    /// Starts `bin serve` with an empty cache and `flags`, and waits for its "lmx listening"
    /// log line. The models folder (LMX_TEST_MODELS, else
    /// .cache/models) is a `--model-root`, so LoadModel takes folders under it.
    pub fn start_with(bin: &Path, cache: &Path, flags: &[&str]) -> Result<Server, String> {
        let models = std::env::var_os("LMX_TEST_MODELS")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models"));
        let mut command = Command::new(bin);
        command
            .args(["--log-format", "json", "--log-filter", "info", "serve"])
            .args(["--listen", "127.0.0.1:0", "--drain-timeout", "2s"])
            .arg("--model-root")
            .arg(&models)
            .args(flags)
            .arg("--cache-dir")
            .arg(cache)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The user's LMX_* settings (tokens, limits) are not this benchmark's; LMX_KERNELS is.
        for (key, _) in std::env::vars_os() {
            if key
                .to_str()
                .is_some_and(|k| k.starts_with("LMX_") && k != "LMX_KERNELS")
            {
                command.env_remove(key);
            }
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if event["message"] == "lmx listening" {
                    if let Some(addr) = event["local_addr"].as_str() {
                        let _ = tx.send(addr.to_owned());
                    }
                }
            }
        });
        let addr: SocketAddr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr
                .parse()
                .map_err(|e| format!("listen address {addr}: {e}"))?,
            Err(_) => {
                let _ = child.kill();
                return Err("the server did not report its address within 60 s".into());
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let channel = runtime
            .block_on(
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| e.to_string())?
                    .connect(),
            )
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        Ok(Server {
            child,
            runtime,
            channel,
        })
    }

    /// LoadModel with a folder path; returns once the model is loaded.
    pub fn load(&self, dir: &Path) -> Result<String, String> {
        let model_id = dir.to_str().ok_or("a non-UTF-8 model path")?.to_owned();
        let mut admin = pb::model_admin_client::ModelAdminClient::new(self.channel.clone());
        self.runtime
            .block_on(admin.load_model(pb::LoadModelRequest {
                model_id: model_id.clone(),
                revision: String::new(),
                options: None,
                alias: String::new(),
            }))
            .map_err(|e| format!("LoadModel {model_id}: {}", e.message()))?;
        Ok(model_id)
    }

    /// User + system CPU seconds the server process has used (all its threads).
    pub fn cpu_seconds(&self) -> Result<f64, String> {
        crate::machine::process_cpu_seconds(&self.child.id().to_string(), false)
            .ok_or_else(|| format!("reading /proc/{}/stat", self.child.id()))
    }

    /// The server's CPU use over `window` with no request in flight, in % of one core.
    pub fn idle_cpu_percent(&self, window: Duration) -> Result<f64, String> {
        let (before, start) = (self.cpu_seconds()?, Instant::now());
        std::thread::sleep(window);
        let used = self.cpu_seconds()? - before;
        Ok(100.0 * used / start.elapsed().as_secs_f64())
    }

    /// Resident memory of the server process, in MiB.
    pub fn rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }

    /// One greedy Generate of up to `new_tokens`, timed by the client from the call.
    pub fn generate(
        &self,
        model_id: &str,
        prompt: &str,
        new_tokens: usize,
    ) -> Result<Sample, String> {
        let stream = self.stream(model_id, prompt, new_tokens, Instant::now(), None);
        self.runtime.block_on(stream)
    }

    /// One greedy Generate per prompt, all at once; times count from their common start.
    pub fn generate_many(
        &self,
        model_id: &str,
        prompts: &[&str],
        new_tokens: usize,
    ) -> Result<Vec<Sample>, String> {
        let start = Instant::now();
        let streams: Vec<_> = prompts
            .iter()
            .map(|p| self.stream(model_id, p, new_tokens, start, None))
            .collect();
        self.runtime.block_on(async move {
            let mut set = tokio::task::JoinSet::new();
            for (i, s) in streams.into_iter().enumerate() {
                set.spawn(async move { (i, s.await) });
            }
            let mut out: Vec<Option<Sample>> = vec![None; prompts.len()];
            while let Some(joined) = set.join_next().await {
                let (i, sample) = joined.map_err(|e| e.to_string())?;
                out[i] = Some(sample?);
            }
            Ok(out
                .into_iter()
                .map(|s| s.expect("every stream joined"))
                .collect())
        })
    }

    /// `prompts` stream `new_tokens` each; once every one has `after` tokens, `long` is sent
    /// (one new token). Returns the streams' samples, when `long` was sent and when its token
    /// came, all in seconds from the start.
    pub fn interfere(
        &self,
        model_id: &str,
        prompts: &[&str],
        new_tokens: usize,
        after: usize,
        long: &str,
    ) -> Result<(Vec<Sample>, f64, f64), String> {
        let start = Instant::now();
        let counts: Vec<Arc<AtomicUsize>> = prompts
            .iter()
            .map(|_| Arc::new(AtomicUsize::new(0)))
            .collect();
        let streams: Vec<_> = prompts
            .iter()
            .zip(&counts)
            .map(|(p, c)| self.stream(model_id, p, new_tokens, start, Some(c.clone())))
            .collect();
        let long = self.stream(model_id, long, 1, start, None);
        self.runtime.block_on(async move {
            let mut set = tokio::task::JoinSet::new();
            for (i, s) in streams.into_iter().enumerate() {
                set.spawn(async move { (i, s.await) });
            }
            while counts.iter().any(|c| c.load(Ordering::Relaxed) < after) {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let sent = start.elapsed().as_secs_f64();
            let long = long.await?;
            let mut out: Vec<Option<Sample>> = vec![None; prompts.len()];
            while let Some(joined) = set.join_next().await {
                let (i, sample) = joined.map_err(|e| e.to_string())?;
                out[i] = Some(sample?);
            }
            let samples = out
                .into_iter()
                .map(|s| s.expect("every stream joined"))
                .collect();
            Ok((samples, sent, long.ttft()))
        })
    }

    /// A Generate call as a future, timed from `start`; `count` follows its tokens.
    fn stream(
        &self,
        model_id: &str,
        prompt: &str,
        new_tokens: usize,
        start: Instant,
        count: Option<Arc<AtomicUsize>>,
    ) -> impl std::future::Future<Output = Result<Sample, String>> + Send + 'static {
        let mut client = pb::inference_client::InferenceClient::new(self.channel.clone());
        let request = pb::GenerateRequest {
            model_id: model_id.into(),
            revision: String::new(),
            prompt: prompt.into(),
            parameters: Some(pb::GenerationParameters {
                max_tokens: Some(new_tokens as i32),
                temperature: Some(0.0),
                ..Default::default()
            }),
            add_special_tokens: false,
        };
        async move {
            let mut stream = client
                .generate(request)
                .await
                .map_err(|e| format!("Generate: {}", e.message()))?
                .into_inner();
            let (mut token_times, mut token_ids) = (Vec::new(), Vec::new());
            let mut prompt_tokens = 0;
            while let Some(item) = stream.next().await {
                match item
                    .map_err(|e| format!("Generate stream: {}", e.message()))?
                    .item
                {
                    Some(pb::generate_response::Item::Token(t)) => {
                        token_times.push(start.elapsed().as_secs_f64());
                        token_ids.push(t.id);
                        if let Some(count) = &count {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(pb::generate_response::Item::Completion(c)) => {
                        prompt_tokens = c.prompt_tokens as usize;
                    }
                    None => {}
                }
            }
            Ok(Sample {
                token_times,
                token_ids,
                prompt_tokens,
            })
        }
    }
}

impl Drop for Server {
    /// SIGTERM (the server drains and exits), then SIGKILL if it is still there after 10 s.
    fn drop(&mut self) {
        // SAFETY: signalling our own child process by its pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
