//! Snapshot check figures (a bench binary: `cargo bench --bench snapshot`).
//!
//! 1. QUICK check of a 16-shard safetensors snapshot in the HF cache layout, at two data sizes:
//!    the time must not grow with the data (it reads headers only). Printed: ms at each size and
//!    their ratio.
//! 2. FULL mode hash throughput against `sha256sum` over the same blob files, in the same run,
//!    page cache warm for both. Printed: MB/s of each and the ratio lmx / sha256sum.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lmx::{
    snapshot::{verify, Mode},
    testing,
};

const SHARDS: usize = 16;
const COMMIT: &str = "2222222222222222222222222222222222222222";

fn build(cache: &Path, repo: &str, floats_per_tensor: usize) -> PathBuf {
    let files = testing::sharded_safetensors_repo(SHARDS, floats_per_tensor);
    testing::write_hf_cache(cache, repo, COMMIT, Some("main"), &files)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time_quick(snapshot: &Path, runs: usize) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                let report = verify(snapshot, Mode::Quick).expect("verify");
                assert!(report.complete, "{:?}", report.problems);
                t.elapsed()
            })
            .collect(),
    )
}

fn blob_files(snapshot: &Path) -> Vec<PathBuf> {
    let blobs = snapshot.parent().unwrap().parent().unwrap().join("blobs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("hub");
    // 2 tensors of f32 per shard: 16 KiB vs 16 MiB per tensor (0.5 MiB vs 512 MiB in all).
    let small = build(&cache, "bench/small", 4 << 10);
    let large = build(&cache, "bench/large", 4 << 20);
    let size = |s: &Path| {
        blob_files(s)
            .iter()
            .map(|f| f.metadata().unwrap().len())
            .sum::<u64>()
    };
    let (small_bytes, large_bytes) = (size(&small), size(&large));

    time_quick(&small, 3);
    time_quick(&large, 3);
    let quick_small = time_quick(&small, 21);
    let quick_large = time_quick(&large, 21);
    println!("QUICK check, {SHARDS}-shard snapshot (median of 21 runs)");
    println!(
        "  {:>8.2} MiB of data: {:>7.3} ms",
        small_bytes as f64 / (1 << 20) as f64,
        quick_small.as_secs_f64() * 1e3
    );
    println!(
        "  {:>8.2} MiB of data: {:>7.3} ms",
        large_bytes as f64 / (1 << 20) as f64,
        quick_large.as_secs_f64() * 1e3
    );
    println!(
        "  time ratio large/small: {:.2} for a data ratio of {:.0}",
        quick_large.as_secs_f64() / quick_small.as_secs_f64(),
        large_bytes as f64 / small_bytes as f64
    );

    // FULL: warm the page cache with one run of each, then measure.
    let files = blob_files(&large);
    let sha256sum = || {
        let t = Instant::now();
        let out = Command::new("sha256sum")
            .args(&files)
            .output()
            .expect("run sha256sum");
        assert!(out.status.success());
        t.elapsed()
    };
    let full = || {
        let t = Instant::now();
        let report = verify(&large, Mode::Full).expect("verify");
        assert!(report.complete);
        assert_eq!(report.bytes_hashed, large_bytes);
        t.elapsed()
    };
    sha256sum();
    full();
    let lmx_time = median((0..5).map(|_| full()).collect());
    let sum_time = median((0..5).map(|_| sha256sum()).collect());
    let mbps = |t: Duration| large_bytes as f64 / 1e6 / t.as_secs_f64();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "FULL hash throughput, {:.0} MiB in {} files (median of 5, page cache warm)",
        large_bytes as f64 / (1 << 20) as f64,
        files.len()
    );
    println!(
        "  lmx verify --full ({threads} threads): {:>8.1} MB/s",
        mbps(lmx_time)
    );
    println!(
        "  sha256sum (1 process):         {:>8.1} MB/s",
        mbps(sum_time)
    );
    println!(
        "  ratio lmx / sha256sum:         {:>8.2}",
        mbps(lmx_time) / mbps(sum_time)
    );
}
