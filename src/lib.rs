//! lmx: a gRPC microservice that pulls language model snapshots from a Hugging Face compatible
//! hub, proves them complete, and serves token streams from a candle engine.
//!
//! Data flows one way: `api` → `manager` → `snapshot` / `engine`. The binary (`src/main.rs`)
//! parses configuration and calls [`run`]; tests call [`run`] with a listener on 127.0.0.1:0.

pub mod api;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod manager;
pub mod pb;
pub mod secret;
pub mod server;
pub mod snapshot;
pub mod telemetry;
pub mod testing;
pub mod util;

use std::future::Future;

use tokio::net::TcpListener;

pub use server::Config;

/// Serves the lmx gRPC API on `listener` until `shutdown` resolves, then drains in-flight calls
/// (up to `config.drain_timeout`) and returns. Metrics are served on `config.metrics_listen` when
/// set.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = match config.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("binding --metrics-listen {addr}: {e}"))?,
        ),
        None => None,
    };
    server::serve(config, listener, metrics, shutdown).await
}

/// [`run`] with an already bound metrics listener (tests bind 127.0.0.1:0).
pub async fn run_with_metrics(
    config: Config,
    listener: TcpListener,
    metrics: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    server::serve(config, listener, Some(metrics), shutdown).await
}
