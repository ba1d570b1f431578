//! The resolved configuration of a running server, assembled from `lmx serve`'s flags: the
//! settings the lower layers own (engine, downloads, cache, model roots) plus the server's own
//! (tokens, TLS, message size, metrics, drain).

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use super::Tokens;
use crate::{
    config::{process_env, SecurityArgs, ServeArgs, DEFAULT_HUB_ENDPOINT},
    manager::{download::DownloadSettings, reference, EngineSettings},
    secret::Secret,
};

/// tonic's default: the largest request message accepted.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 << 20;

/// What [`crate::run`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Hugging Face cache folder models live in.
    pub cache_dir: PathBuf,
    /// Folders (besides the cache) whose model folders clients may name by absolute path.
    pub model_roots: Vec<PathBuf>,
    /// How long in-flight calls may run after a shutdown signal.
    pub drain_timeout: Duration,
    /// Engine limits, memory budget, defaults.
    pub engine: EngineSettings,
    /// Download manager settings (the hub endpoint and token included).
    pub downloads: DownloadSettings,
    /// Bearer tokens of the admin and inference APIs.
    pub tokens: Tokens,
    /// TLS material; plaintext when None.
    pub tls: Option<TlsFiles>,
    /// Where to serve Prometheus metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// (model_id, revision) pairs to load at start.
    pub preload: Vec<(String, String)>,
    /// Aliases set at start (`--alias NAME=REFERENCE`).
    pub aliases: Vec<(String, crate::manager::aliases::Target)>,
    /// Largest request message, in bytes.
    pub max_message_size: usize,
}

impl Config {
    /// A configuration with defaults for everything but the cache folder.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            model_roots: Vec::new(),
            drain_timeout: Duration::from_secs(30),
            engine: EngineSettings::default(),
            downloads: DownloadSettings::new(DEFAULT_HUB_ENDPOINT),
            tokens: Tokens::default(),
            tls: None,
            metrics_listen: None,
            preload: Vec::new(),
            aliases: Vec::new(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    /// Applies the Hugging Face fallbacks from the process environment; refuses inconsistent
    /// limits (at start, not at the first request).
    pub fn from_args(args: &ServeArgs) -> Result<Self, String> {
        let hub = args.hub.resolve(&process_env);
        let (tokens, tls) = security(&args.security, args.listen)?;
        let mut downloads = args.downloads.resolve(&hub.hub_endpoint, hub.hf_token);
        args.limits.apply_to_downloads(&mut downloads);
        Ok(Self {
            tokens,
            tls,
            metrics_listen: args.metrics_listen,
            preload: args.load.iter().map(|s| reference::split(s)).collect(),
            aliases: args
                .aliases
                .iter()
                .map(|flag| crate::manager::aliases::parse_flag(flag))
                .collect::<Result<_, _>>()?,
            downloads,
            cache_dir: hub.cache_dir,
            model_roots: args.model_roots.clone(),
            drain_timeout: args.drain_timeout,
            engine: args.engine.resolve(
                crate::config::available_memory(),
                &args.limits.engine_limits(),
            )?,
            max_message_size: usize::try_from(args.limits.max_message_size)
                .map_err(|_| "--max-message-size is too large".to_owned())?,
        })
    }
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

/// Tokens and TLS material; refuses an exposed admin API without a token.
fn security(args: &SecurityArgs, listen: SocketAddr) -> Result<(Tokens, Option<TlsFiles>), String> {
    let admin = match (&args.admin_token, &args.admin_token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => Some(read_secret(path, "--admin-token-file")?),
        (None, None) => None,
    };
    let inference = match (&args.inference_token, &args.inference_token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => Some(read_secret(path, "--inference-token-file")?),
        (None, None) => None,
    };
    if !listen.ip().is_loopback() && admin.is_none() && !args.insecure_admin {
        return Err(format!(
            "refusing to listen on {listen} without an admin token: anyone reaching it could pull and \
             delete models. Set --admin-token / --admin-token-file, or --insecure-admin to accept that"
        ));
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: read_file(cert, "--tls-cert")?,
            key: Secret::new(
                String::from_utf8(read_file(key, "--tls-key")?)
                    .map_err(|_| "--tls-key is not PEM text".to_owned())?,
            ),
            client_ca: args
                .tls_client_ca
                .as_deref()
                .map(|p| read_file(p, "--tls-client-ca"))
                .transpose()?,
        }),
        _ => None,
    };
    Ok((Tokens { admin, inference }, tls))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn config(args: &[&str]) -> Result<Config, String> {
        let serve =
            Serve::try_parse_from(["serve"].iter().chain(args)).map_err(|e| e.to_string())?;
        Config::from_args(&serve.args)
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let mut config = Config::new("/tmp");
        config.downloads.hf_token = Some(Secret::new("hf_supersecret"));
        config.tokens.admin = Some(Secret::new("admin_supersecret"));
        let debug = format!("{config:?}");
        assert!(!debug.contains("hf_supersecret") && !debug.contains("admin_supersecret"));
    }

    #[test]
    fn flags_become_the_layers_settings() {
        let c = config(&[
            "--model-root",
            "/models",
            "--max-downloads",
            "2",
            "--max-watchers",
            "3",
            "--max-message-size",
            "1MiB",
            "--max-embed-inputs",
            "5",
            "--load",
            "org/m@v1,/models/x",
        ])
        .unwrap();
        assert_eq!(c.model_roots, [PathBuf::from("/models")]);
        assert_eq!((c.downloads.max_active, c.downloads.max_watchers), (2, 3));
        assert_eq!(c.max_message_size, 1 << 20);
        assert_eq!(c.engine.load.limits.max_embed_inputs, 5);
        assert_eq!(
            c.preload,
            [
                ("org/m".to_owned(), "v1".to_owned()),
                ("/models/x".to_owned(), String::new())
            ]
        );
    }

    #[test]
    fn an_exposed_admin_api_needs_a_token() {
        let err = config(&["--listen", "0.0.0.0:0"]).unwrap_err();
        assert!(err.contains("without an admin token"), "{err}");
        config(&["--listen", "0.0.0.0:0", "--admin-token", "t"]).unwrap();
    }
}
