//! The generated lmx.v1 types and services (from proto/ via build.rs). Generated code never lives in src/.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("lmx.v1");

/// Encoded `FileDescriptorSet` of the lmx.v1 protos and their imports, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lmx_v1_descriptor");
