//! Flags and environment variables of `lmx serve` (clap derive), turned into the settings each
//! layer owns: the manager's [`EngineSettings`](crate::manager::EngineSettings) and
//! [`DownloadSettings`](crate::manager::download::DownloadSettings), the cache folder and the
//! model roots. Every flag is also an `LMX_*` environment variable; the `///` docs are the
//! `--help` text. Hugging Face's own variables (HF_HUB_CACHE, HF_HOME, HF_ENDPOINT, HF_TOKEN) are
//! honoured as fallbacks, resolved the way Python's huggingface_hub resolves them, so lmx shares
//! its cache with the Python tools.
//!
//! This module only parses and resolves; it starts nothing and names no layer above the manager:
//! the server assembles its own configuration from these (`server::Config::from_args`), and the
//! client subcommands' flags live beside them in `cli/`.

mod hub;
mod serve;

pub use hub::{CacheArgs, HubArgs, ResolvedHub, DEFAULT_HUB_ENDPOINT};
pub use serve::{
    available_memory, DownloadArgs, DtypeArg, EngineArgs, LimitArgs, MemoryBudget, SecurityArgs,
    ServeArgs,
};

use clap::ValueEnum;

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable, coloured when stderr is a terminal.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Reads a non-empty environment variable.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// "64MiB", "1 GB", "512": a byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size like 64MiB: {e}"))
}
