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
    Serve(ServeArgs),
    /// Check that a model snapshot is complete, offline (exit 0 complete, 1 incomplete, 2 error).
    Verify(crate::cli::verify::VerifyArgs),
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
    /// Base URL of the hub, without a trailing slash.
    pub hub_endpoint: String,
    /// Access token for the hub.
    pub hf_token: Option<Secret>,
    /// How long in-flight calls may run after a shutdown signal.
    pub drain_timeout: Duration,
}

impl Config {
    /// A configuration with defaults for everything but the cache folder.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            hub_endpoint: DEFAULT_HUB_ENDPOINT.to_owned(),
            hf_token: None,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl ServeArgs {
    /// Applies the Hugging Face fallbacks from the process environment.
    pub fn resolve(&self) -> Config {
        let hub = self.hub.resolve(&process_env);
        Config {
            cache_dir: hub.cache_dir,
            hub_endpoint: hub.hub_endpoint,
            hf_token: hub.hf_token,
            drain_timeout: self.drain_timeout,
        }
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
        let config = Config {
            hf_token: Some(Secret::new("hf_supersecret")),
            ..Config::new("/tmp")
        };
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
}
