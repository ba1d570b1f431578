//! Flags of `lmx serve` and the lower layers' settings they become.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

use super::{parse_size, HubArgs};
use crate::{
    engine::{validate_device, KvDtype, Limits, LoadOptions},
    manager::{download::DownloadSettings, EngineSettings},
    secret::Secret,
};

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
    /// optionally `@revision`, or an absolute folder path inside a --model-root. The pod turns ready
    /// (lmx.v1.Inference SERVING) once one is loaded; failures are logged, not fatal.
    #[arg(long = "load", env = "LMX_LOAD", value_delimiter = ',')]
    pub load: Vec<String>,

    /// An alias for a model (repeatable or comma-separated): `NAME=REFERENCE`, where REFERENCE
    /// is what --load takes. Every RPC accepts NAME in place of the reference; ListModels shows
    /// it. NAME: 1 to 64 letters, digits, '.', '_' or '-'.
    #[arg(long = "alias", env = "LMX_ALIASES", value_delimiter = ',')]
    pub aliases: Vec<String>,

    /// Address of the Prometheus metrics listener (`GET /metrics`); off when unset.
    #[arg(long, env = "LMX_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Folder whose model folders clients may name by absolute path in LoadModel, VerifyModel
    /// and --load (repeatable or comma-separated). A path must resolve, symlinks followed, inside
    /// one of these or the cache folder; by default only the cache folder is allowed.
    #[arg(long = "model-root", env = "LMX_MODEL_ROOTS", value_delimiter = ',')]
    pub model_roots: Vec<PathBuf>,

    #[command(flatten)]
    pub engine: EngineArgs,

    #[command(flatten)]
    pub limits: LimitArgs,

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

/// Request and resource limits of `lmx serve`: what one client may ask of the server.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest gRPC request message the server accepts (RESOURCE_EXHAUSTED beyond it).
    #[arg(long, env = "LMX_MAX_MESSAGE_SIZE", default_value = "4MiB", value_parser = parse_size)]
    pub max_message_size: u64,

    /// Most prompt tokens a request may have (after the chat template); unset: the model's
    /// context length.
    #[arg(long, env = "LMX_MAX_PROMPT_TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_prompt_tokens: Option<u32>,

    /// Most messages one Chat request may carry.
    #[arg(long, env = "LMX_MAX_MESSAGES", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_messages: u32,

    /// Most strings one Embed request may carry.
    #[arg(long, env = "LMX_MAX_EMBED_INPUTS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_embed_inputs: u32,

    /// Downloads running at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "LMX_MAX_DOWNLOADS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_downloads: u32,

    /// Progress streams (DownloadModel, WatchDownload) open at once; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "LMX_MAX_WATCHERS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_watchers: u32,
}

impl LimitArgs {
    /// The engine's share of the limits (stop strings and max_tokens come from [`EngineArgs`]).
    pub fn engine_limits(&self) -> Limits {
        Limits {
            max_prompt_tokens: self.max_prompt_tokens.map(|n| n as usize),
            max_messages: self.max_messages as usize,
            max_embed_inputs: self.max_embed_inputs as usize,
            ..Limits::default()
        }
    }

    /// Applies the download limits to `settings`.
    pub fn apply_to_downloads(&self, settings: &mut DownloadSettings) {
        settings.max_active = self.max_downloads as usize;
        settings.max_watchers = self.max_watchers as usize;
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
    /// The download manager's settings for `hub_endpoint`.
    pub fn resolve(&self, hub_endpoint: &str, hf_token: Option<Secret>) -> DownloadSettings {
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

    /// Generate, Chat, Tokenize and Embed on a model that is in the cache but not loaded load it
    /// first (the snapshot guard, memory budget and LRU eviction apply; concurrent first
    /// requests share one load). `false`: they fail with FAILED_PRECONDITION (MODEL_NOT_LOADED).
    #[arg(long, env = "LMX_LOAD_ON_DEMAND", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub load_on_demand: bool,

    /// Unload a model loaded on demand after it has been idle this long; `0s` keeps it loaded.
    #[arg(long, env = "LMX_DEFAULT_KEEP_ALIVE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub default_keep_alive: Duration,

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
    #[arg(long, env = "LMX_DEVICE", default_value = "cpu", value_parser = validate_device)]
    pub device: String,

    /// Data type of weights in memory by default (f32 on CPU: bf16 is much slower there).
    #[arg(long, env = "LMX_DTYPE", value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,

    /// What the native engine's KV caches store keys and values as: f16 (as llama.cpp) halves
    /// their memory and the bytes attention reads per token; f32 keeps them exactly as
    /// computed. Models on candle's code keep their own.
    #[arg(long, env = "LMX_KV_CACHE_DTYPE", value_enum, default_value_t = KvDtypeArg::F16)]
    pub kv_cache_dtype: KvDtypeArg,
}

/// `--kv-cache-dtype` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvDtypeArg {
    F32,
    F16,
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
    pub fn resolve(&self, total_memory: u64, limits: &Limits) -> Result<EngineSettings, String> {
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
                gguf_file: None,
                kv_cache_dtype: match self.kv_cache_dtype {
                    KvDtypeArg::F32 => KvDtype::F32,
                    KvDtypeArg::F16 => KvDtype::F16,
                },
                limits: Limits {
                    max_tokens_cap: self.max_tokens as usize,
                    default_max_tokens: self.default_max_tokens as usize,
                    max_stop_sequences: self.max_stop_sequences as usize,
                    ..limits.clone()
                },
            },
            memory_budget: self.memory_budget.bytes(total_memory),
            keep_alive: (!self.keep_alive.is_zero()).then_some(self.keep_alive),
            load_on_demand: self.load_on_demand,
            on_demand_keep_alive: (!self.default_keep_alive.is_zero())
                .then_some(self.default_keep_alive),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `lmx serve`'s flags on their own.
    #[derive(Debug, Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        Serve::try_parse_from(["serve"].iter().chain(args)).map(|s| s.args)
    }

    #[test]
    fn serve_flags_parse_durations_addresses_and_roots() {
        let args = serve(&[
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "1m 30s",
            "--model-root",
            "/a",
            "--model-root",
            "/b,/c",
        ])
        .unwrap();
        assert_eq!(args.drain_timeout, Duration::from_secs(90));
        assert_eq!(args.listen.port(), 0);
        assert_eq!(
            args.model_roots,
            [PathBuf::from("/a"), "/b".into(), "/c".into()]
        );
        let err = serve(&["--listen", "nowhere"]).unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
    }

    #[test]
    fn limits_have_defaults_and_refuse_zero() {
        let args = serve(&[]).unwrap();
        assert_eq!(args.limits.max_message_size, 4 << 20);
        assert_eq!(args.limits.max_prompt_tokens, None);
        let limits = args.limits.engine_limits();
        assert_eq!((limits.max_messages, limits.max_embed_inputs), (256, 128));
        for flag in [
            "--max-messages",
            "--max-embed-inputs",
            "--max-downloads",
            "--max-watchers",
            "--max-prompt-tokens",
        ] {
            assert!(serve(&[flag, "0"]).is_err(), "{flag} 0");
        }
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
        let err = args
            .engine
            .resolve(1 << 30, &Limits::default())
            .unwrap_err();
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
            "--max-prompt-tokens",
            "1000",
        ])
        .unwrap();
        let engine = ok
            .engine
            .resolve(1 << 40, &ok.limits.engine_limits())
            .unwrap();
        assert_eq!(engine.memory_budget, 1 << 30);
        assert_eq!(engine.keep_alive, Some(Duration::from_secs(300)));
        assert!(engine.load_on_demand, "on by default");
        assert_eq!(engine.on_demand_keep_alive, Some(Duration::from_secs(300)));
        let off = serve(&["--load-on-demand=false", "--default-keep-alive", "0s"]).unwrap();
        let off = off
            .engine
            .resolve(1 << 40, &off.limits.engine_limits())
            .unwrap();
        assert!(!off.load_on_demand);
        assert_eq!(off.on_demand_keep_alive, None);
        assert_eq!(engine.load.device, "cuda:1");
        assert_eq!(engine.load.limits.max_prompt_tokens, Some(1000));
    }
}
