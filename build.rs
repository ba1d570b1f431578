//! Generates the lmx.v1 gRPC code and the file descriptor set that server reflection serves.
//! protoc comes from the `protoc-bin-vendored` crate, so no system install is needed.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("lmx_v1_descriptor.bin"))
        .compile_protos(
            &["proto/lmx/v1/admin.proto", "proto/lmx/v1/inference.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
