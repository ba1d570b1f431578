//! Command-line subcommands other than `serve`. Offline ones (`verify`) work on the cache
//! directly; client ones talk to a server over the same gRPC API as any other client.

pub mod client;
pub mod generate;
pub mod models;
pub mod pull;
pub mod verify;
