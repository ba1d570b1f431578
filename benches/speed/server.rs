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
    sync::mpsc,
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
    /// Starts `bin serve` with an empty cache and waits for its "lmx listening" log line.
    pub fn start(bin: &Path, cache: &Path) -> Result<Server, String> {
        let mut command = Command::new(bin);
        command
            .args(["--log-format", "json", "--log-filter", "info", "serve"])
            .args(["--listen", "127.0.0.1:0", "--drain-timeout", "2s"])
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
        self.runtime.block_on(async move {
            let start = Instant::now();
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
        })
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
