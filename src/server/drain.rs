//! Graceful drain: a tower layer around every gRPC service.
//!
//! While serving, it counts in-flight calls (health and reflection excepted: probes and reflection
//! are not work, and a health Watch may stay open forever). Once draining starts, new calls other
//! than health and reflection are answered UNAVAILABLE at once, so a mesh retries them elsewhere,
//! while calls already running continue. When the drain ends (every counted call finished, or the
//! drain timeout passed), every response stream still open — health watches included — is ended
//! with an UNAVAILABLE status in its trailers, so clients see a clean gRPC status instead of a reset
//! connection and the transport can shut down promptly.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use super::around::{Around, AroundLayer, Response};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFutureOwned},
    task::{task_tracker::TaskTrackerToken, TaskTracker},
};
use tonic::{body::Body as TonicBody, Status};

use crate::error::{reason, ApiError};

/// Shared drain state: one per server.
#[derive(Clone, Default)]
pub struct Drain {
    draining: Arc<AtomicBool>,
    in_flight: TaskTracker,
    stop: CancellationToken,
}

impl Drain {
    /// A drain that has not started.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, refuse new calls (but health and reflection) with UNAVAILABLE.
    pub fn start(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.in_flight.close();
    }

    /// Whether [`Drain::start`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Waits until every counted call has finished or `timeout` passes; true when all finished.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.in_flight.wait())
            .await
            .is_ok()
    }

    /// Calls still running (health and reflection excluded).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Ends every open response stream with UNAVAILABLE and lets the transport shut down.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Resolves once [`Drain::stop`] was called.
    pub fn stopped(&self) -> WaitForCancellationFutureOwned {
        self.stop.clone().cancelled_owned()
    }

    /// The tower layer to put around the server's services.
    pub fn layer(&self) -> AroundLayer<Self> {
        AroundLayer(self.clone())
    }
}

/// Calls to these services are neither counted nor refused while draining.
fn is_exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

impl Around for Drain {
    /// The call's in-flight token (none for exempt calls) and the drain's end.
    type State = (
        Option<TaskTrackerToken>,
        Pin<Box<WaitForCancellationFutureOwned>>,
    );

    fn before(&self, path: &str, _: &http::HeaderMap) -> Result<Self::State, Box<Status>> {
        let exempt = is_exempt(path);
        if !exempt && self.is_draining() {
            return Err(Box::new(
                ApiError::new(
                    tonic::Code::Unavailable,
                    reason::DRAINING,
                    "lmx is shutting down and takes no new calls; retry on another replica",
                )
                .into(),
            ));
        }
        let token = (!exempt).then(|| self.in_flight.token());
        Ok((token, Box::pin(self.stopped())))
    }

    fn after((token, stop): Self::State, response: Response) -> Response {
        response.map(|inner| {
            TonicBody::new(DrainBody {
                inner,
                _token: token,
                stop,
                state: BodyState::Open,
            })
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Open,
    /// The inner body sent its trailers: the call's status is decided, nothing to cut.
    TrailersSent,
    /// We ended the stream with our own trailers.
    Cut,
}

/// A response body that holds its call's in-flight token until it is dropped and ends early with
/// UNAVAILABLE trailers once the drain stops.
struct DrainBody {
    inner: TonicBody,
    _token: Option<TaskTrackerToken>,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    state: BodyState,
}

impl Body for DrainBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.state == BodyState::Cut {
            return Poll::Ready(None);
        }
        // Frames that are ready go out first (a health watch's last NOT_SERVING, say).
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            if let Some(Ok(f)) = &frame {
                if f.is_trailers() {
                    self.state = BodyState::TrailersSent;
                }
            }
            return Poll::Ready(frame);
        }
        if self.state == BodyState::Open && self.stop.as_mut().poll(cx).is_ready() {
            self.state = BodyState::Cut;
            let status: Status = ApiError::new(
                tonic::Code::Unavailable,
                reason::DRAINING,
                "lmx shut down before this call finished",
            )
            .into();
            let mut trailers = http::HeaderMap::new();
            if let Err(status) = status.add_header(&mut trailers) {
                return Poll::Ready(Some(Err(status)));
            }
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.state == BodyState::Cut || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tower::{Layer, Service, ServiceExt};

    type Frames = mpsc::Sender<Result<Frame<Bytes>, Status>>;

    /// A service whose every response body streams whatever the test pushes into it.
    fn streaming_service(
        bodies: mpsc::UnboundedSender<Frames>,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<TonicBody>,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone {
        tower::service_fn(move |_req: http::Request<()>| {
            let bodies = bodies.clone();
            async move {
                let (tx, rx) = mpsc::channel(4);
                bodies.send(tx).unwrap();
                let body = http_body_util::StreamBody::new(ReceiverStream::new(rx));
                Ok::<_, Infallible>(http::Response::new(TonicBody::new(body)))
            }
        })
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    fn grpc_status(frame: &Frame<Bytes>) -> Option<String> {
        frame
            .trailers_ref()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn draining_refuses_new_work_but_not_health_and_waits_for_running_calls() {
        let drain = Drain::new();
        let (bodies_tx, mut bodies_rx) = mpsc::unbounded_channel();
        let svc = drain.layer().layer(streaming_service(bodies_tx));

        let running = svc
            .clone()
            .oneshot(request("/lmx.v1.Inference/Generate"))
            .await
            .unwrap();
        let producer = bodies_rx.recv().await.unwrap();
        assert_eq!(drain.in_flight(), 1);

        drain.start();
        let refused = svc
            .clone()
            .oneshot(request("/lmx.v1.ModelAdmin/ListModels"))
            .await
            .unwrap();
        let refused = Status::from_header_map(refused.headers()).expect("status in headers");
        assert_eq!(refused.code(), tonic::Code::Unavailable);

        let health = svc
            .clone()
            .oneshot(request("/grpc.health.v1.Health/Check"))
            .await
            .unwrap();
        let _health_producer = bodies_rx.recv().await.unwrap();
        assert_eq!(drain.in_flight(), 1, "health is not counted");

        // The running call finishes on its own: the drain becomes idle.
        assert!(!drain.wait_idle(Duration::from_millis(10)).await);
        producer
            .send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        drop(producer);
        let mut body = running.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "x");
        assert!(body.frame().await.is_none());
        drop(body);
        assert!(drain.wait_idle(Duration::from_secs(5)).await);

        // Stopping cuts the open health body with UNAVAILABLE trailers.
        drain.stop();
        let mut body = health.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(grpc_status(&frame).as_deref(), Some("14"));
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn ready_frames_go_out_before_the_cut_and_finished_calls_are_not_cut() {
        let drain = Drain::new();
        let (bodies_tx, mut bodies_rx) = mpsc::unbounded_channel();
        let svc = drain.layer().layer(streaming_service(bodies_tx));

        let watch = svc
            .clone()
            .oneshot(request("/grpc.health.v1.Health/Watch"))
            .await
            .unwrap();
        let watch_tx = bodies_rx.recv().await.unwrap();
        let done = svc
            .clone()
            .oneshot(request("/lmx.v1.ModelAdmin/GetDownload"))
            .await
            .unwrap();
        let done_tx = bodies_rx.recv().await.unwrap();
        let mut ok = http::HeaderMap::new();
        Status::ok("").add_header(&mut ok).unwrap();
        done_tx.send(Ok(Frame::trailers(ok))).await.unwrap();

        watch_tx
            .send(Ok(Frame::data(Bytes::from_static(b"last"))))
            .await
            .unwrap();
        drain.start();
        drain.stop();

        let mut body = watch.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "last");
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(grpc_status(&frame).as_deref(), Some("14"));

        let mut body = done.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(grpc_status(&frame).as_deref(), Some("0"), "own status kept");
    }
}
