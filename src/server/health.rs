//! grpc.health.v1 statuses (tonic-health).
//!
//! "" and "lmx.v1.ModelAdmin" are SERVING while the server is up. "lmx.v1.Inference" follows the
//! engine's readiness, published on a `watch` channel: SERVING exactly while at least one model
//! is loaded and ready. On shutdown every status turns NOT_SERVING before anything else happens,
//! so load balancers and meshes stop sending work first.

use tokio::{sync::watch, task::JoinHandle};
use tonic_health::{server::HealthReporter, ServingStatus};

/// Service name of the admin API in health checks.
pub const ADMIN: &str = "lmx.v1.ModelAdmin";
/// Service name of the inference API in health checks.
pub const INFERENCE: &str = "lmx.v1.Inference";
/// The overall server's service name.
pub const SERVER: &str = "";

/// Owns the health reporter and the task that follows inference readiness.
pub struct Health {
    reporter: HealthReporter,
    follower: JoinHandle<()>,
}

impl Health {
    /// Marks the server and the admin API SERVING and makes "lmx.v1.Inference" follow `ready`.
    pub async fn start(reporter: HealthReporter, ready: watch::Receiver<bool>) -> Self {
        reporter
            .set_service_status(SERVER, ServingStatus::Serving)
            .await;
        reporter
            .set_service_status(ADMIN, ServingStatus::Serving)
            .await;
        // Registered before the follower runs, so a probe never sees "service not registered".
        reporter
            .set_service_status(INFERENCE, ServingStatus::NotServing)
            .await;
        let follower = tokio::spawn(follow_readiness(reporter.clone(), ready));
        Self { reporter, follower }
    }

    /// Turns every status NOT_SERVING for good (readiness changes are no longer followed).
    pub async fn shut_down(self) {
        self.follower.abort();
        // Wait for the follower to be gone, so it cannot flip Inference back to SERVING.
        let _ = self.follower.await;
        for service in [SERVER, ADMIN, INFERENCE] {
            self.reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    }
}

async fn follow_readiness(reporter: HealthReporter, mut ready: watch::Receiver<bool>) {
    loop {
        let status = if *ready.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status(INFERENCE, status).await;
        if ready.changed().await.is_err() {
            // The engine is gone: nothing will ever be ready again.
            reporter
                .set_service_status(INFERENCE, ServingStatus::NotServing)
                .await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;
    use tonic::Request;
    use tonic_health::pb::{
        health_check_response::ServingStatus as Wire, health_server::Health as _,
        HealthCheckRequest,
    };

    #[tokio::test]
    async fn inference_follows_readiness_until_shutdown() {
        let reporter = tonic_health::server::HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let (ready_tx, ready_rx) = watch::channel(false);
        let health = Health::start(reporter, ready_rx).await;

        let request = || {
            Request::new(HealthCheckRequest {
                service: INFERENCE.into(),
            })
        };
        let mut watch = service.watch(request()).await.unwrap().into_inner();
        let next = |s: Option<Result<tonic_health::pb::HealthCheckResponse, _>>| {
            Wire::try_from(s.unwrap().unwrap().status).unwrap()
        };
        assert_eq!(next(watch.next().await), Wire::NotServing);
        ready_tx.send(true).unwrap();
        assert_eq!(next(watch.next().await), Wire::Serving);
        ready_tx.send(false).unwrap();
        assert_eq!(next(watch.next().await), Wire::NotServing);
        ready_tx.send(true).unwrap();
        assert_eq!(next(watch.next().await), Wire::Serving);

        health.shut_down().await;
        assert_eq!(next(watch.next().await), Wire::NotServing);
        // Readiness no longer matters once shut down.
        ready_tx.send_replace(true);
        for name in [SERVER, ADMIN, INFERENCE] {
            let status = service
                .check(Request::new(HealthCheckRequest {
                    service: name.into(),
                }))
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(
                Wire::try_from(status).unwrap(),
                Wire::NotServing,
                "{name:?}"
            );
        }
    }
}
