//! Prometheus metrics (the `metrics` facade and metrics-exporter-prometheus), served as text on a
//! separate HTTP listener (`--metrics-listen`, path `/metrics`).
//!
//! A tower layer counts every RPC by method and gRPC code and times it to the end of its response
//! stream. The engine side (tokens, time to first token, per-token latency) and the downloads
//! (bytes, failures by code) record through the facade where the events happen; gauges that
//! describe state (loaded models and their memory, queue depth, active downloads) are sampled at
//! scrape time.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use super::around::{Around, AroundLayer, Response};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tonic::{body::Body as TonicBody, Code, Status};

/// The process-wide recorder (installed once; several servers in one process share it).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let seconds = |b: &[f64]| b.to_vec();
        PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("lmx_rpc_duration_seconds".into()),
                &seconds(&[
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0,
                ]),
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("lmx_time_to_first_token_seconds".into()),
                    &seconds(&[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("lmx_token_latency_seconds".into()),
                    &seconds(&[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
                )
            })
            .and_then(|b| b.install_recorder())
            .expect("installing the metrics recorder")
    })
}

/// The UPPER_SNAKE name of a gRPC code, as label value.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn status_code(headers: &http::HeaderMap) -> Option<Code> {
    Status::from_header_map(headers).map(|s| s.code())
}

/// Counts and times every RPC.
#[derive(Clone, Default)]
pub struct Metrics;

impl Metrics {
    pub fn layer() -> AroundLayer<Self> {
        AroundLayer(Self)
    }
}

impl Around for Metrics {
    /// The method and when the call started.
    type State = (Arc<str>, Instant);

    fn before(&self, path: &str, _: &http::HeaderMap) -> Result<Self::State, Box<Status>> {
        Ok((path.into(), Instant::now()))
    }

    fn after((method, started): Self::State, response: Response) -> Response {
        // A trailers-only answer (most errors) carries the status in the headers.
        let code = status_code(response.headers());
        response.map(|inner| {
            TonicBody::new(MetricsBody {
                inner,
                record: Some(Record {
                    method,
                    started,
                    code,
                }),
            })
        })
    }
}

struct Record {
    method: Arc<str>,
    started: Instant,
    code: Option<Code>,
}

impl Record {
    fn finish(self, code: Code) {
        let method = self.method.to_string();
        metrics::counter!("lmx_rpc_requests_total", "method" => method.clone(), "code" => code_name(code)).increment(1);
        metrics::histogram!("lmx_rpc_duration_seconds", "method" => method)
            .record(self.started.elapsed().as_secs_f64());
    }
}

struct MetricsBody {
    inner: TonicBody,
    record: Option<Record>,
}

impl Body for MetricsBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(code) = f.trailers_ref().and_then(status_code) {
                    if let Some(r) = self.record.as_mut() {
                        r.code = Some(code);
                    }
                }
            }
            Some(Err(status)) => {
                let code = status.code();
                if let Some(r) = self.record.take() {
                    r.finish(code);
                }
            }
            None => {
                if let Some(r) = self.record.take() {
                    let code = r.code.unwrap_or(Code::Ok);
                    r.finish(code);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MetricsBody {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (unless the status was already known).
        if let Some(r) = self.record.take() {
            let code = r.code.unwrap_or(Code::Cancelled);
            r.finish(code);
        }
    }
}

/// Serves `GET /metrics` on `listener` until `stop` resolves; `sample` refreshes the state
/// gauges before each scrape.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sample: Arc<dyn Fn() + Send + Sync>,
    stop: impl Future<Output = ()>,
) {
    let handle = handle();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else { continue };
        let sample = sample.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let sample = sample.clone();
                    async move {
                        let response = if req.method() == http::Method::GET
                            && req.uri().path() == "/metrics"
                        {
                            sample();
                            http::Response::builder()
                                .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                                .body(http_body_util::Full::new(Bytes::from(handle.render())))
                        } else {
                            http::Response::builder()
                                .status(http::StatusCode::NOT_FOUND)
                                .body(http_body_util::Full::new(Bytes::from_static(
                                    b"not found; try /metrics\n",
                                )))
                        };
                        response
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}
