//! Property tests over bytes from outside: safetensors headers, GGUF headers, zip archives and
//! index files. Whatever the bytes: no panic, and no allocation beyond what the input justifies
//! (a huge declared header length must not make the checker allocate it). A counting global
//! allocator records the largest single allocation of each case.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

use lmx::{snapshot::check_file_bytes, testing};
use proptest::prelude::*;

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// No single allocation may exceed this (inputs are at most a few KiB; candle's GGUF reader and
/// the zip reader use small fixed buffers).
const ALLOCATION_BOUND: usize = 16 << 20;

const NAMES: &[&str] = &[
    "model.safetensors",
    "model.gguf",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "config.json",
];

/// Checks `bytes` under every file kind; returns the largest allocation seen.
fn check_all(bytes: &[u8]) -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    for name in NAMES {
        if let Err(problem) = check_file_bytes(name, bytes) {
            assert!(!problem.detail.is_empty());
        }
    }
    LARGEST.load(Ordering::Relaxed)
}

fn valid_samples() -> Vec<Vec<u8>> {
    let st = testing::safetensors_file(&[("a".into(), 8), ("b".into(), 3)], 1);
    let index = br#"{"metadata":{"total_size":44},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#.to_vec();
    vec![st, testing::gguf_file(true), testing::torch_zip(3), index]
}

proptest! {
    // Fixed seed: the same cases every run. PROPTEST_CASES sets the count (default 256) for a
    // longer hunt.
    #![proptest_config(ProptestConfig {
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6c6d78),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic_or_overallocate(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let largest = check_all(&bytes);
        prop_assert!(largest < ALLOCATION_BOUND, "allocated {largest} bytes");
    }

    #[test]
    fn declared_lengths_are_bounded_by_the_file(len in any::<u64>(), tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&tail);
        let largest = check_all(&bytes);
        prop_assert!(largest < ALLOCATION_BOUND, "allocated {largest} bytes for declared length {len}");
        // GGUF: magic, version, then a huge tensor / metadata count.
        let mut gguf = b"GGUF".to_vec();
        gguf.extend_from_slice(&3u32.to_le_bytes());
        gguf.extend_from_slice(&len.to_le_bytes());
        gguf.extend_from_slice(&len.rotate_left(17).to_le_bytes());
        gguf.extend_from_slice(&tail);
        let largest = check_all(&gguf);
        prop_assert!(largest < ALLOCATION_BOUND, "allocated {largest} bytes for GGUF counts {len}");
    }

    #[test]
    fn mutated_valid_files_never_panic(
        sample in 0usize..4,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = valid_samples().swap_remove(sample);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        let largest = check_all(&bytes);
        prop_assert!(largest < ALLOCATION_BOUND, "allocated {largest} bytes");
    }
}

#[test]
fn valid_samples_pass_their_own_check() {
    let samples = valid_samples();
    check_file_bytes("model.safetensors", &samples[0]).unwrap();
    check_file_bytes("model.gguf", &samples[1]).unwrap();
    check_file_bytes("pytorch_model.bin", &samples[2]).unwrap();
    check_file_bytes("model.safetensors.index.json", &samples[3]).unwrap();
}

#[test]
fn a_header_length_near_u64_max_is_refused_without_allocating_it() {
    let mut bytes = (u64::MAX - 7).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    LARGEST.store(0, Ordering::Relaxed);
    let problem = check_file_bytes("model.safetensors", &bytes).unwrap_err();
    assert!(LARGEST.load(Ordering::Relaxed) < ALLOCATION_BOUND);
    assert!(problem.detail.contains("limit"), "{}", problem.detail);
}
