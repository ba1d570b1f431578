//! Command line and environment configuration (clap derive). Every flag is also an `LMX_*`
//! environment variable; the `///` docs are the `--help` text. Hugging Face's own variables
//! (HF_HUB_CACHE, HF_HOME, HF_ENDPOINT, HF_TOKEN) are honoured as fallbacks, resolved the way
//! Python's huggingface_hub resolves them, so lmx shares its cache with the Python tools.
//!
//! This module only parses and resolves; it starts nothing.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    engine::{Limits, LoadOptions},
    manager::{download::DownloadSettings, EngineSettings},
};

/// The public hub used when neither `--hub-endpoint` nor HF_ENDPOINT is set.
pub const DEFAULT_HUB_ENDPOINT: &str = "https://huggingface.co";

/// lmx: pull, verify and serve language models over gRPC.
#[derive(Debug, Parser)]
#[command(name = "lmx", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log output format.
    #[arg(long, env = "LMX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `lmx=debug,tower=warn`.
    #[arg(long, env = "LMX_LOG", default_value = "info", global = true)]
    pub log_filter: String,
}

/// What lmx should do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server.
    Serve(Box<ServeArgs>),
    /// Check that a model snapshot is complete, offline or on a server with --server (exit 0
    /// complete, 1 incomplete, 2 error).
    Verify(crate::cli::verify::VerifyArgs),
    /// Download a model with a progress display (exit 0, or 10 + the DownloadErrorCode).
    Pull(Box<crate::cli::pull::PullArgs>),
    /// List the models on disk and loaded.
    Ls(crate::cli::models::ListArgs),
    /// List the loaded models.
    Ps(crate::cli::models::ListArgs),
    /// Delete a model's snapshots from the server's cache.
    Rm(crate::cli::models::ModelArgs),
    /// Load a model into the engine.
    Load(crate::cli::models::LoadArgs),
    /// Unload a model.
    Unload(crate::cli::models::ModelArgs),
    /// Complete a prompt, printing tokens as they stream.
    Generate(crate::cli::generate::GenerateArgs),
    /// Chat with a model interactively.
    Chat(crate::cli::generate::ChatArgs),
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable, coloured when stderr is a terminal.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Flags of `lmx serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on for gRPC (host:port; port 0 picks a free port).
    #[arg(long, env = "LMX_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub hub: HubArgs,

    /// On SIGTERM/SIGINT, how long in-flight calls may run before the server stops anyway
    /// (e.g. `30s`, `2m`).
    #[arg(long, env = "LMX_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    #[command(flatten)]
    pub security: SecurityArgs,

    /// Models to load at start (repeatable or comma-separated): a repository id in the cache,
    /// optionally `@revision`, or an absolute folder path. The pod turns ready
    /// (lmx.v1.Inference SERVING) once one is loaded; failures are logged, not fatal.
    #[arg(long = "load", env = "LMX_LOAD", value_delimiter = ',')]
    pub load: Vec<String>,

    /// Address of the Prometheus metrics listener (`GET /metrics`); off when unset.
    #[arg(long, env = "LMX_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    #[command(flatten)]
    pub engine: EngineArgs,

    #[command(flatten)]
    pub downloads: DownloadArgs,
}

/// Authentication and TLS flags of `lmx serve`.
#[derive(Debug, Clone, Args)]
pub struct SecurityArgs {
    /// Bearer token every lmx.v1.ModelAdmin call must present. Never logged.
    #[arg(
        long,
        env = "LMX_ADMIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "admin_token_file"
    )]
    pub admin_token: Option<Secret>,

    /// File holding the admin token (e.g. a mounted Kubernetes secret).
    #[arg(long, env = "LMX_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Bearer token every lmx.v1.Inference call must present (the admin token is accepted too).
    #[arg(
        long,
        env = "LMX_INFERENCE_TOKEN",
        hide_env_values = true,
        conflicts_with = "inference_token_file"
    )]
    pub inference_token: Option<Secret>,

    /// File holding the inference token.
    #[arg(long, env = "LMX_INFERENCE_TOKEN_FILE")]
    pub inference_token_file: Option<PathBuf>,

    /// Allow listening on a non-loopback address without an admin token (the admin API can pull
    /// and delete models).
    #[arg(long, env = "LMX_INSECURE_ADMIN")]
    pub insecure_admin: bool,

    /// TLS certificate chain (PEM) to serve gRPC over TLS.
    #[arg(long, env = "LMX_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM).
    #[arg(long, env = "LMX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM) that client certificates must chain to: mutual TLS, every client needs a
    /// certificate.
    #[arg(long, env = "LMX_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

/// TLS material, read at start.
#[derive(Clone)]
pub struct TlsFiles {
    pub cert: Vec<u8>,
    pub key: Secret,
    pub client_ca: Option<Vec<u8>>,
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles")
            .field("cert_bytes", &self.cert.len())
            .field("mutual", &self.client_ca.is_some())
            .finish()
    }
}

fn read_secret(path: &Path, flag: &str) -> Result<Secret, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{flag} {} is empty", path.display()));
    }
    Ok(Secret::new(token))
}

fn read_file(path: &Path, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

impl SecurityArgs {
    /// Tokens and TLS material; refuses an exposed admin API without a token.
    pub fn resolve(
        &self,
        listen: SocketAddr,
    ) -> Result<(crate::server::Tokens, Option<TlsFiles>), String> {
        let admin = match (&self.admin_token, &self.admin_token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(read_secret(path, "--admin-token-file")?),
            (None, None) => None,
        };
        let inference = match (&self.inference_token, &self.inference_token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(read_secret(path, "--inference-token-file")?),
            (None, None) => None,
        };
        if !listen.ip().is_loopback() && admin.is_none() && !self.insecure_admin {
            return Err(format!(
                "refusing to listen on {listen} without an admin token: anyone reaching it could pull and \
                 delete models. Set --admin-token / --admin-token-file, or --insecure-admin to accept that"
            ));
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: read_file(cert, "--tls-cert")?,
                key: Secret::new(
                    String::from_utf8(read_file(key, "--tls-key")?)
                        .map_err(|_| "--tls-key is not PEM text".to_owned())?,
                ),
                client_ca: self
                    .tls_client_ca
                    .as_deref()
                    .map(|p| read_file(p, "--tls-client-ca"))
                    .transpose()?,
            }),
            _ => None,
        };
        Ok((crate::server::Tokens { admin, inference }, tls))
    }
}

/// Download flags of `lmx serve`.
#[derive(Debug, Clone, Args)]
pub struct DownloadArgs {
    /// Files of one download transferred at once.
    #[arg(long, env = "LMX_DOWNLOAD_FILES", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub download_files: u32,

    /// Ranged parts of one large file transferred at once (files of at least twice
    /// --download-part-size are split).
    #[arg(long, env = "LMX_DOWNLOAD_PARTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub download_parts: u32,

    /// Size of the ranged parts of large files.
    #[arg(long, env = "LMX_DOWNLOAD_PART_SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub download_part_size: u64,

    /// A transfer with no bytes for this long is restarted from where it stopped.
    #[arg(long, env = "LMX_DOWNLOAD_STALL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub download_stall_timeout: Duration,

    /// Retries of a failing hub request (429, 5xx, connection errors, stalls) before
    /// HUB_UNAVAILABLE; the delays grow exponentially.
    #[arg(long, env = "LMX_DOWNLOAD_RETRIES", default_value_t = 5)]
    pub download_retries: u32,

    /// First retry delay (doubling up to 10s).
    #[arg(long, env = "LMX_DOWNLOAD_RETRY_DELAY", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub download_retry_delay: Duration,

    /// Free disk space to keep beyond what a download needs; checked before the first byte.
    #[arg(long, env = "LMX_DISK_MARGIN", default_value = "512MiB", value_parser = parse_size)]
    pub disk_margin: u64,
}

impl DownloadArgs {
    fn resolve(&self, hub_endpoint: &str, hf_token: Option<Secret>) -> DownloadSettings {
        let mut settings = DownloadSettings::new(hub_endpoint);
        settings.hf_token = hf_token;
        settings.task.files_in_parallel = self.download_files as usize;
        settings.task.transfer.parts_in_parallel = self.download_parts as usize;
        settings.task.transfer.part_size = self.download_part_size.max(1 << 20);
        settings.task.transfer.stall_timeout = self.download_stall_timeout;
        settings.task.disk_margin = self.disk_margin;
        settings.retry.attempts = self.download_retries as usize;
        settings.retry.min_delay = self.download_retry_delay;
        settings
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size like 64MiB: {e}"))
}

/// Engine flags of `lmx serve`.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Memory all loaded models may take together: bytes (`16GiB`, `512MB`) or a share of the
    /// machine's (or container's) memory (`80%`). A load beyond it evicts the least recently used
    /// idle model, or fails with RESOURCE_EXHAUSTED.
    #[arg(long, env = "LMX_MEMORY_BUDGET", default_value = "80%", value_parser = parse_memory_budget)]
    pub memory_budget: MemoryBudget,

    /// Unload a model after it has been idle this long (`5m`, `1h`); `0s` keeps models loaded.
    /// LoadModel's keep_alive overrides it per model.
    #[arg(long, env = "LMX_KEEP_ALIVE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub keep_alive: Duration,

    /// Requests queued or running per model; beyond it, RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "LMX_MAX_QUEUE", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_queue: u32,

    /// Sequences generated concurrently per model (llama family: batched into one forward
    /// pass per step; other architectures: interleaved token by token).
    #[arg(long, env = "LMX_MAX_CONCURRENT", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_concurrent: u32,

    /// Most prompt tokens one batched step processes: longer prompts are processed in chunks
    /// between the decode steps of the other sequences.
    #[arg(long, env = "LMX_PREFILL_CHUNK", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub prefill_chunk: u32,

    /// Keep finished sequences' KV caches (within the model's KV budget, least recently used
    /// evicted first) and reuse them for prompts that start with the same tokens.
    #[arg(long, env = "LMX_PREFIX_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,

    /// Largest `max_tokens` a request may ask for.
    #[arg(long, env = "LMX_MAX_TOKENS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,

    /// `max_tokens` of requests that leave it unset (bounded by the context and --max-tokens).
    #[arg(long, env = "LMX_DEFAULT_MAX_TOKENS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub default_max_tokens: u32,

    /// Most stop strings per request.
    #[arg(long, env = "LMX_MAX_STOP_SEQUENCES", default_value_t = 4)]
    pub max_stop_sequences: u32,

    /// Device models load onto by default: `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` build feature).
    #[arg(long, env = "LMX_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: String,

    /// Data type of weights in memory by default (f32 on CPU: bf16 is much slower there).
    #[arg(long, env = "LMX_DTYPE", value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
}

/// `--dtype` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// `--memory-budget`: bytes, or a percentage of the memory available to the process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryBudget {
    Bytes(u64),
    Percent(f64),
}

impl MemoryBudget {
    /// The budget in bytes given the memory available.
    pub fn bytes(self, total_memory: u64) -> u64 {
        match self {
            Self::Bytes(b) => b,
            Self::Percent(p) => (total_memory as f64 * p / 100.0) as u64,
        }
    }
}

fn parse_memory_budget(s: &str) -> Result<MemoryBudget, String> {
    if let Some(p) = s.strip_suffix('%') {
        let p: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a percentage like 80%"))?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(format!("a percentage must be in (0, 100], got {s}"));
        }
        return Ok(MemoryBudget::Percent(p));
    }
    let size: bytesize::ByteSize = s
        .parse()
        .map_err(|e| format!("{s:?} is not a size like 16GiB or 80%: {e}"))?;
    if size.as_u64() == 0 {
        return Err("the memory budget must be above 0".into());
    }
    Ok(MemoryBudget::Bytes(size.as_u64()))
}

pub fn parse_device(s: &str) -> Result<String, String> {
    let valid = s == "cpu"
        || s == "cuda"
        || s.strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok());
    if valid {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a device; use cpu, cuda or cuda:N"))
    }
}

/// Memory available to this process: the cgroup (container) limit when set, else MemTotal.
pub fn available_memory() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(u64::MAX);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    cgroup.map_or(total, |limit| limit.min(total))
}

impl EngineArgs {
    /// The engine settings, or why the flags are inconsistent.
    pub fn resolve(&self, total_memory: u64) -> Result<EngineSettings, String> {
        if self.default_max_tokens > self.max_tokens {
            return Err(format!(
                "--default-max-tokens ({}) must be <= --max-tokens ({})",
                self.default_max_tokens, self.max_tokens
            ));
        }
        Ok(EngineSettings {
            load: LoadOptions {
                dtype: Some(self.dtype.to_candle()),
                device: self.device.clone(),
                max_queue: self.max_queue as usize,
                max_concurrent: self.max_concurrent as usize,
                prefill_chunk: self.prefill_chunk as usize,
                kv_budget: None,
                prefix_cache: self.prefix_cache,
                limits: Limits {
                    max_tokens_cap: self.max_tokens as usize,
                    default_max_tokens: self.default_max_tokens as usize,
                    max_stop_sequences: self.max_stop_sequences as usize,
                    ..Limits::default()
                },
            },
            memory_budget: self.memory_budget.bytes(total_memory),
            keep_alive: (!self.keep_alive.is_zero()).then_some(self.keep_alive),
        })
    }
}

/// Where models are kept; shared by the server and offline commands.
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// Model cache folder (Hugging Face cache layout). Default: HF_HUB_CACHE, else HF_HOME/hub,
    /// else ~/.cache/huggingface/hub, as huggingface_hub resolves it.
    #[arg(long, env = "LMX_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

impl CacheArgs {
    /// The cache folder, with huggingface_hub's fallbacks (`env` returns non-empty values only).
    pub fn resolve(&self, env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| {
            env("HF_HUB_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home(env).join("hub"))
        })
    }

    /// [`CacheArgs::resolve`] against the process environment.
    pub fn resolve_from_env(&self) -> PathBuf {
        self.resolve(&process_env)
    }
}

/// Reads a non-empty environment variable.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Where models come from and where they are kept.
#[derive(Debug, Clone, Args)]
pub struct HubArgs {
    #[command(flatten)]
    pub cache: CacheArgs,

    /// Base URL of the model hub (any server speaking the Hugging Face hub protocol).
    /// Default: HF_ENDPOINT, else https://huggingface.co.
    #[arg(long, env = "LMX_HUB_ENDPOINT")]
    pub hub_endpoint: Option<String>,

    /// Access token for the hub. Default: HF_TOKEN, else the file HF_HOME/token. Never logged.
    #[arg(long, env = "LMX_HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<Secret>,
}

/// A secret string (an access token) that never shows in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Resolved configuration of a running server: what [`crate::run`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Hugging Face cache folder models live in.
    pub cache_dir: PathBuf,
    /// How long in-flight calls may run after a shutdown signal.
    pub drain_timeout: Duration,
    /// Engine limits, memory budget, defaults.
    pub engine: EngineSettings,
    /// Download manager settings (the hub endpoint and token included).
    pub downloads: DownloadSettings,
    /// Bearer tokens of the admin and inference APIs.
    pub tokens: crate::server::Tokens,
    /// TLS material; plaintext when None.
    pub tls: Option<TlsFiles>,
    /// Where to serve Prometheus metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// (model_id, revision) pairs to load at start.
    pub preload: Vec<(String, String)>,
}

/// "org/name@rev" → ("org/name", "rev"); paths and plain ids keep an empty revision.
pub fn split_model_spec(spec: &str) -> (String, String) {
    match spec.rsplit_once('@') {
        Some((id, rev)) if !spec.starts_with('/') && !rev.is_empty() && !id.is_empty() => {
            (id.to_owned(), rev.to_owned())
        }
        _ => (spec.to_owned(), String::new()),
    }
}

impl Config {
    /// A configuration with defaults for everything but the cache folder.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            drain_timeout: Duration::from_secs(30),
            engine: EngineSettings::default(),
            downloads: DownloadSettings::new(DEFAULT_HUB_ENDPOINT),
            tokens: crate::server::Tokens::default(),
            tls: None,
            metrics_listen: None,
            preload: Vec::new(),
        }
    }
}

impl ServeArgs {
    /// Applies the Hugging Face fallbacks from the process environment; refuses inconsistent
    /// limits (at start, not at the first request).
    pub fn resolve(&self) -> Result<Config, String> {
        let hub = self.hub.resolve(&process_env);
        let (tokens, tls) = self.security.resolve(self.listen)?;
        Ok(Config {
            tokens,
            tls,
            metrics_listen: self.metrics_listen,
            preload: self.load.iter().map(|s| split_model_spec(s)).collect(),
            downloads: self.downloads.resolve(&hub.hub_endpoint, hub.hf_token),
            cache_dir: hub.cache_dir,
            drain_timeout: self.drain_timeout,
            engine: self.engine.resolve(available_memory())?,
        })
    }
}

/// [`HubArgs`] with every fallback applied.
#[derive(Debug, Clone)]
pub struct ResolvedHub {
    pub cache_dir: PathBuf,
    pub hub_endpoint: String,
    pub hf_token: Option<Secret>,
}

impl HubArgs {
    /// Resolves the flags against environment lookups (`env` returns non-empty values only).
    pub fn resolve(&self, env: &dyn Fn(&str) -> Option<String>) -> ResolvedHub {
        let hf_home = hf_home(env);
        let cache_dir = self.cache.resolve(env);
        let hub_endpoint = self
            .hub_endpoint
            .clone()
            .or_else(|| env("HF_ENDPOINT"))
            .unwrap_or_else(|| DEFAULT_HUB_ENDPOINT.to_owned())
            .trim_end_matches('/')
            .to_owned();
        let hf_token = self
            .hf_token
            .clone()
            .filter(|t| !t.expose().is_empty())
            .or_else(|| env("HF_TOKEN").map(Secret))
            .or_else(|| env("HUGGING_FACE_HUB_TOKEN").map(Secret))
            .or_else(|| {
                let path = env("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                read_token_file(&path)
            });
        ResolvedHub {
            cache_dir,
            hub_endpoint,
            hf_token,
        }
    }
}

/// HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface.
fn hf_home(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(home) = env("HF_HOME") {
        return PathBuf::from(home);
    }
    let cache = env("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        env("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/"))
            .join(".cache")
    });
    cache.join("huggingface")
}

fn read_token_file(path: &Path) -> Option<Secret> {
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| Secret(token.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(args: HubArgs, vars: &[(&str, &str)]) -> ResolvedHub {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        args.resolve(&move |name| vars.get(name).cloned())
    }

    fn no_flags() -> HubArgs {
        HubArgs {
            cache: CacheArgs { cache_dir: None },
            hub_endpoint: None,
            hf_token: None,
        }
    }

    #[test]
    fn cache_dir_follows_huggingface_hub_precedence() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("HOME", "/home/u")], "/home/u/.cache/huggingface/hub"),
            (
                &[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")],
                "/xdg/huggingface/hub",
            ),
            (&[("HOME", "/home/u"), ("HF_HOME", "/hf")], "/hf/hub"),
            (&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/cache")], "/cache"),
        ];
        for (vars, want) in cases {
            assert_eq!(
                resolve(no_flags(), vars).cache_dir,
                PathBuf::from(want),
                "{vars:?}"
            );
        }
        let flag = HubArgs {
            cache: CacheArgs {
                cache_dir: Some("/flag".into()),
            },
            ..no_flags()
        };
        assert_eq!(
            resolve(flag, &[("HF_HUB_CACHE", "/cache")]).cache_dir,
            PathBuf::from("/flag")
        );
    }

    #[test]
    fn endpoint_prefers_flag_then_hf_endpoint_and_drops_trailing_slash() {
        assert_eq!(resolve(no_flags(), &[]).hub_endpoint, DEFAULT_HUB_ENDPOINT);
        assert_eq!(
            resolve(no_flags(), &[("HF_ENDPOINT", "http://mirror:8080/")]).hub_endpoint,
            "http://mirror:8080"
        );
        let flag = HubArgs {
            hub_endpoint: Some("http://flag".into()),
            ..no_flags()
        };
        assert_eq!(
            resolve(flag, &[("HF_ENDPOINT", "http://env")]).hub_endpoint,
            "http://flag"
        );
    }

    #[test]
    fn token_from_flag_env_or_token_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_file\n").unwrap();
        let home = dir.path().to_str().unwrap();

        let got = resolve(no_flags(), &[("HF_HOME", home)]).hf_token;
        assert_eq!(got.unwrap().expose(), "hf_file");
        let got = resolve(no_flags(), &[("HF_HOME", home), ("HF_TOKEN", "hf_env")]).hf_token;
        assert_eq!(got.unwrap().expose(), "hf_env");
        let flag = HubArgs {
            hf_token: Some(Secret::new("hf_flag")),
            ..no_flags()
        };
        let got = resolve(flag, &[("HF_TOKEN", "hf_env")]).hf_token;
        assert_eq!(got.unwrap().expose(), "hf_flag");
        assert!(resolve(no_flags(), &[("HF_HOME", "/nonexistent")])
            .hf_token
            .is_none());
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let mut config = Config::new("/tmp");
        config.downloads.hf_token = Some(Secret::new("hf_supersecret"));
        assert!(!format!("{config:?}").contains("hf_supersecret"));
    }

    #[test]
    fn serve_flags_parse_durations_and_addresses() {
        let cli = Cli::try_parse_from([
            "lmx",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "1m 30s",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        assert_eq!(args.drain_timeout, Duration::from_secs(90));
        assert_eq!(args.listen.port(), 0);
        let err = Cli::try_parse_from(["lmx", "serve", "--listen", "nowhere"]).unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
    }

    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cli = Cli::try_parse_from(["lmx", "serve"].iter().chain(args))?;
        match cli.command {
            Command::Serve(args) => Ok(*args),
            _ => panic!("expected serve"),
        }
    }

    #[test]
    fn the_deploy_manifests_arguments_parse() {
        // deploy/k8s/base/deployment.yaml and components/prepull/init-container.yaml.
        let serve = [
            "lmx",
            "serve",
            "--listen",
            "0.0.0.0:50051",
            "--metrics-listen",
            "0.0.0.0:9090",
            "--cache-dir",
            "/models",
            "--drain-timeout",
            "30s",
            "--log-format",
            "json",
            "--admin-token-file",
            "/var/run/secrets/lmx/admin-token",
            "--inference-token-file",
            "/var/run/secrets/lmx/inference-token",
        ];
        Cli::try_parse_from(serve).unwrap();
        let pull = [
            "lmx",
            "pull",
            "--local",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "--cache-dir",
            "/models",
            "--include",
            "*.json",
            "--include",
            "*.safetensors",
            "--log-format",
            "json",
        ];
        Cli::try_parse_from(pull).unwrap();
    }

    #[test]
    fn memory_budgets_accept_sizes_and_percentages() {
        assert_eq!(
            parse_memory_budget("80%").unwrap(),
            MemoryBudget::Percent(80.0)
        );
        assert_eq!(
            parse_memory_budget("16GiB").unwrap(),
            MemoryBudget::Bytes(16 << 30)
        );
        assert_eq!(
            parse_memory_budget("500 MB").unwrap(),
            MemoryBudget::Bytes(500_000_000)
        );
        assert_eq!(MemoryBudget::Percent(50.0).bytes(1000), 500);
        for bad in ["0", "150%", "lots", "0%"] {
            assert!(parse_memory_budget(bad).is_err(), "{bad}");
        }
        assert!(available_memory() > 0);
    }

    #[test]
    fn inconsistent_engine_limits_are_refused_at_start() {
        let args = serve(&["--max-tokens", "100", "--default-max-tokens", "200"]).unwrap();
        let err = args.resolve().unwrap_err();
        assert!(
            err.contains("--default-max-tokens (200) must be <= --max-tokens (100)"),
            "{err}"
        );
        assert!(serve(&["--max-queue", "0"]).is_err());
        assert!(serve(&["--device", "gpu"])
            .unwrap_err()
            .to_string()
            .contains("use cpu, cuda or cuda:N"));
        let ok = serve(&[
            "--memory-budget",
            "1GiB",
            "--keep-alive",
            "5m",
            "--device",
            "cuda:1",
        ])
        .unwrap();
        let config = ok.resolve().unwrap();
        assert_eq!(config.engine.memory_budget, 1 << 30);
        assert_eq!(config.engine.keep_alive, Some(Duration::from_secs(300)));
        assert_eq!(config.engine.load.device, "cuda:1");
    }
}
