//! Where models come from and where they are kept: the cache folder, the hub endpoint and its
//! token, with huggingface_hub's fallbacks. Shared by `lmx serve` and the offline commands.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::secret::Secret;

/// The public hub used when neither `--hub-endpoint` nor HF_ENDPOINT is set.
pub const DEFAULT_HUB_ENDPOINT: &str = "https://huggingface.co";

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
        self.resolve(&super::process_env)
    }
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
            .or_else(|| env("HF_TOKEN").map(Secret::new))
            .or_else(|| env("HUGGING_FACE_HUB_TOKEN").map(Secret::new))
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
    (!token.is_empty()).then(|| Secret::new(token))
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
}
