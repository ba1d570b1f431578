//! Assembles the gRPC server (lmx.v1 services, health, reflection v1 and v1alpha), runs it on a
//! listener and orchestrates the graceful shutdown:
//!
//! 1. the shutdown future resolves (SIGTERM/SIGINT in `main`, a oneshot in tests);
//! 2. every health status turns NOT_SERVING;
//! 3. new calls are refused with UNAVAILABLE, calls in flight keep running;
//! 4. once they finished, or the drain timeout passed, streams still open end with UNAVAILABLE
//!    and the transport shuts down; `run` returns `Ok`.

mod around;
mod auth;
mod config;
mod drain;
mod health;
pub mod metrics;

pub use auth::Tokens;
pub use config::{Config, TlsFiles, DEFAULT_MAX_MESSAGE_SIZE};
pub use drain::Drain;
pub use health::{ADMIN as ADMIN_SERVICE, INFERENCE as INFERENCE_SERVICE};

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{server::TcpIncoming, Certificate, Identity, Server, ServerTlsConfig};

use crate::{
    api::{admin::AdminApi, inference::InferenceApi},
    manager::{Cache, Manager},
    pb,
};

/// How long the transport may take to close connections once every stream has ended.
const TRANSPORT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the lmx gRPC API on `listener` (and metrics on `metrics`, when given) until
/// `shutdown` resolves, then drains and returns.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let local_addr = listener
        .local_addr()
        .context("reading the listener's address")?;
    // The recorder exists before anything records.
    metrics::handle();
    tracing::debug!(?config, "configuration");

    let (reporter, health_service) = tonic_health::server::health_reporter();
    // The model registry publishes "at least one model is loaded" here.
    let (ready_tx, ready_rx) = watch::channel(false);
    let health = health::Health::start(reporter, ready_rx).await;
    let cache = Cache::new(config.cache_dir.clone())
        .with_model_roots(&config.model_roots)
        .map_err(|e| anyhow::anyhow!("--model-root: {e}"))?;
    // A --load folder outside the roots is a configuration error, not a log line.
    for (model_id, revision) in &config.preload {
        if let Err(e) = cache.check_model_ref(model_id, revision) {
            anyhow::bail!("--load {model_id}: {e}");
        }
    }
    let manager = Arc::new(
        Manager::new(
            cache,
            config.engine.clone(),
            config.downloads.clone(),
            ready_tx,
        )
        .map_err(|e| anyhow::anyhow!("starting the model manager: {e}"))?,
    );

    for (name, target) in &config.aliases {
        if let Err(e) = manager
            .cache()
            .check_model_ref(&target.model_id, &target.revision)
        {
            anyhow::bail!("--alias {name}: {e}");
        }
        manager
            .aliases()
            .set(name, &target.model_id, &target.revision)
            .map_err(|e| anyhow::anyhow!("--alias {name}: {e}"))?;
    }

    for (model_id, revision) in config.preload.clone() {
        let models = manager.models().clone();
        tokio::spawn(async move {
            match models.load(&model_id, &revision, Default::default()).await {
                Ok(_) => tracing::info!(model = %model_id, "loaded at start (--load)"),
                Err(e) => tracing::error!(model = %model_id, error = %e, "--load failed"),
            }
        });
    }

    // google.rpc's descriptors (ErrorInfo, BadRequest, PreconditionFailure, ResourceInfo, ... and
    // the google.protobuf types they import) are served too, so that grpcurl and other reflection
    // clients decode the details of every error instead of printing an opaque Any.
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service (v1)")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service (v1alpha)")?;

    let drain = Drain::new();
    let mut builder = Server::builder();
    if let Some(tls) = &config.tls {
        let mut tls_config =
            ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, tls.key.expose()));
        if let Some(ca) = &tls.client_ca {
            tls_config = tls_config.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(tls_config).context("configuring TLS")?;
    }
    let router = builder
        .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
        .layer(metrics::Metrics::layer())
        .layer(drain.layer())
        .layer(auth::Auth::layer(&config.tokens))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            pb::model_admin_server::ModelAdminServer::new(AdminApi::new(manager.clone()))
                .max_decoding_message_size(config.max_message_size),
        )
        .add_service(
            pb::inference_server::InferenceServer::new(InferenceApi::new(manager.clone()))
                .max_decoding_message_size(config.max_message_size),
        );
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, drain.stopped()));
    tracing::info!(%local_addr, tls = config.tls.is_some(), "lmx listening");
    if let Some(metrics_listener) = metrics {
        let metrics_addr = metrics_listener
            .local_addr()
            .context("reading the metrics listener's address")?;
        let sampled = manager.clone();
        let known = std::sync::Mutex::new(std::collections::HashSet::<String>::new());
        let sample = Arc::new(move || sample_gauges(&sampled, &known));
        tokio::spawn(metrics::serve(metrics_listener, sample, drain.stopped()));
        tracing::info!(%metrics_addr, "metrics listening");
    }

    tokio::select! {
        () = shutdown => {}
        result = &mut server => {
            // The transport stopped on its own: that is an error (a shutdown goes through `drain`).
            result.context("the server task panicked")?.context("the gRPC server failed")?;
            anyhow::bail!("the gRPC server stopped unexpectedly");
        }
    }

    tracing::info!(drain_timeout = ?config.drain_timeout, "shutdown requested: draining");
    // Refuse new work before telling anyone: a client that sees NOT_SERVING and calls again is
    // refused, never served.
    drain.start();
    health.shut_down().await;
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

/// State gauges, refreshed at each scrape; models that went away drop to zero.
fn sample_gauges(manager: &Manager, known: &std::sync::Mutex<std::collections::HashSet<String>>) {
    use crate::manager::models::ModelStatus;
    let mut seen = std::collections::HashSet::new();
    let mut loaded = 0u64;
    for status in manager.models().list() {
        if let ModelStatus::Loaded(model) = status {
            loaded += 1;
            let key = model.key.to_string();
            let stats = model.engine.stats();
            ::metrics::gauge!("lmx_model_memory_bytes", "model" => key.clone())
                .set(model.engine.description().memory_bytes as f64);
            ::metrics::gauge!("lmx_queue_depth", "model" => key.clone())
                .set(stats.in_flight as f64);
            ::metrics::gauge!("lmx_active_sequences", "model" => key.clone())
                .set(stats.active as f64);
            ::metrics::gauge!("lmx_kv_cache_bytes", "model" => key.clone())
                .set(model.engine.description().kv_cache_bytes as f64);
            ::metrics::gauge!("lmx_kv_cache_used_bytes", "model" => key.clone())
                .set(stats.kv_cache_used_bytes as f64);
            ::metrics::counter!("lmx_prompt_tokens_cached_total", "model" => key.clone())
                .absolute(stats.cached_prompt_tokens);
            ::metrics::counter!("lmx_prompt_tokens_computed_total", "model" => key.clone())
                .absolute(stats.prompt_tokens_computed);
            for kind in crate::engine::StepKind::ALL {
                let i = kind as usize;
                ::metrics::counter!("lmx_batch_steps_total", "model" => key.clone(), "kind" => kind.name())
                    .absolute(stats.steps[i]);
                // Whole microseconds: a counter holds integers.
                ::metrics::counter!("lmx_batch_step_microseconds_total", "model" => key.clone(), "kind" => kind.name())
                    .absolute(stats.step_nanos[i] / 1_000);
            }
            ::metrics::counter!("lmx_batch_sequences_total", "model" => key.clone())
                .absolute(stats.step_sequences);
            seen.insert(key);
        }
    }
    let mut known = known
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for gone in known.difference(&seen) {
        ::metrics::gauge!("lmx_model_memory_bytes", "model" => gone.clone()).set(0.0);
        ::metrics::gauge!("lmx_queue_depth", "model" => gone.clone()).set(0.0);
        ::metrics::gauge!("lmx_active_sequences", "model" => gone.clone()).set(0.0);
        ::metrics::gauge!("lmx_kv_cache_bytes", "model" => gone.clone()).set(0.0);
        ::metrics::gauge!("lmx_kv_cache_used_bytes", "model" => gone.clone()).set(0.0);
    }
    *known = seen;
    ::metrics::gauge!("lmx_models_loaded").set(loaded as f64);
    let active = manager
        .downloads()
        .list()
        .iter()
        .filter(|p| !p.state.is_terminal())
        .count();
    ::metrics::gauge!("lmx_downloads_active").set(active as f64);
}
