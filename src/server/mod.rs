//! Assembles the gRPC server (lmx.v1 services, health, reflection v1 and v1alpha), runs it on a
//! listener and orchestrates the graceful shutdown:
//!
//! 1. the shutdown future resolves (SIGTERM/SIGINT in `main`, a oneshot in tests);
//! 2. every health status turns NOT_SERVING;
//! 3. new calls are refused with UNAVAILABLE, calls in flight keep running;
//! 4. once they finished, or the drain timeout passed, streams still open end with UNAVAILABLE
//!    and the transport shuts down; `run` returns `Ok`.

mod drain;
mod health;

pub use drain::Drain;
pub use health::{ADMIN as ADMIN_SERVICE, INFERENCE as INFERENCE_SERVICE};

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{server::TcpIncoming, Server};

use crate::{
    api::{admin::AdminApi, inference::InferenceApi},
    config::Config,
    manager::Manager,
    pb,
};

/// How long the transport may take to close connections once every stream has ended.
const TRANSPORT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the lmx gRPC API on `listener` until `shutdown` resolves, then drains and returns.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let local_addr = listener
        .local_addr()
        .context("reading the listener's address")?;
    tracing::debug!(?config, "configuration");

    let (reporter, health_service) = tonic_health::server::health_reporter();
    // The model registry publishes "at least one model is loaded" here.
    let (ready_tx, ready_rx) = watch::channel(false);
    let health = health::Health::start(reporter, ready_rx).await;
    let manager = Arc::new(
        Manager::new(
            config.cache_dir.clone(),
            config.engine.clone(),
            config.downloads.clone(),
            ready_tx,
        )
        .map_err(|e| anyhow::anyhow!("starting the model manager: {e}"))?,
    );

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service (v1)")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service (v1alpha)")?;

    let drain = Drain::new();
    let router = Server::builder()
        .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
        .layer(drain.layer())
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::model_admin_server::ModelAdminServer::new(
            AdminApi::new(manager.clone()),
        ))
        .add_service(pb::inference_server::InferenceServer::new(
            InferenceApi::new(manager.clone()),
        ));
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, drain.stopped()));
    tracing::info!(%local_addr, "lmx listening");

    tokio::select! {
        () = shutdown => {}
        result = &mut server => {
            // The transport stopped on its own: that is an error (a shutdown goes through `drain`).
            result.context("the server task panicked")?.context("the gRPC server failed")?;
            anyhow::bail!("the gRPC server stopped unexpectedly");
        }
    }

    tracing::info!(drain_timeout = ?config.drain_timeout, "shutdown requested: draining");
    health.shut_down().await;
    drain.start();
    let in_flight = drain.in_flight();
    if drain.wait_idle(config.drain_timeout).await {
        tracing::info!(in_flight, "drained: every call finished");
    } else {
        tracing::warn!(
            still_running = drain.in_flight(),
            "drain timeout passed; ending the calls still running"
        );
    }
    drain.stop();
    match tokio::time::timeout(TRANSPORT_CLOSE_TIMEOUT, &mut server).await {
        Ok(result) => {
            result
                .context("the server task panicked")?
                .context("the gRPC server failed")?;
        }
        Err(_) => {
            tracing::warn!("connections did not close in time; dropping them");
            server.abort();
        }
    }
    drop(manager);
    tracing::info!("lmx stopped");
    Ok(())
}
