//! One tower layer shape for the server's call wrappers (auth, drain, metrics): look at a call
//! before the service runs — answer it right there, or keep some state — then wrap the response.
//! Each wrapper implements [`Around`]; the tower plumbing lives here once.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::{body::Body as TonicBody, Status};
use tower::{Layer, Service};

pub type Response = http::Response<TonicBody>;

/// What a wrapper does around each gRPC call.
pub trait Around: Clone {
    /// Kept from [`Around::before`] to [`Around::after`].
    type State: Send + 'static;

    /// Looks at the call (its path, e.g. "/lmx.v1.Inference/Generate", and headers): `Err` answers
    /// it with that status without running the service.
    fn before(&self, path: &str, headers: &http::HeaderMap) -> Result<Self::State, Box<Status>>;

    /// Wraps the service's response (its body, typically).
    fn after(state: Self::State, response: Response) -> Response;
}

/// The layer of an [`Around`].
#[derive(Clone)]
pub struct AroundLayer<A>(pub A);

impl<S, A: Around> Layer<S> for AroundLayer<A> {
    type Service = AroundService<S, A>;
    fn layer(&self, inner: S) -> Self::Service {
        AroundService {
            inner,
            around: self.0.clone(),
        }
    }
}

/// The service an [`AroundLayer`] produces.
#[derive(Clone)]
pub struct AroundService<S, A> {
    inner: S,
    around: A,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, A> Service<http::Request<B>> for AroundService<S, A>
where
    S: Service<http::Request<B>, Response = Response>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    A: Around,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.around.before(req.uri().path(), req.headers()) {
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
            Ok(state) => {
                let response = self.inner.call(req);
                Box::pin(async move { Ok(A::after(state, response.await?)) })
            }
        }
    }
}
