//! The gRPC edge: the only code that knows tonic and the generated types. Each file implements one
//! service, validates and converts requests into domain calls, and converts results and errors
//! (through [`crate::error`]) back into messages.

pub mod admin;
pub mod convert;
pub mod inference;

use std::pin::Pin;

use futures::Stream;
use tonic::Status;

/// A server-streaming response.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
