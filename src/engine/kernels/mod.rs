//! Compute kernels of the engine's own forward pass: matrix-vector and matrix-matrix products
//! over weights in f32, f16, bf16 and GGUF block formats, and the small row-wise ops around them.
//!
//! Every kernel has one job and comes in up to three flavours chosen at run time
//! ([`Isa::detect`], once per process): AVX-512, AVX2 + FMA, and a portable scalar one that also
//! builds on aarch64. No `-C target-cpu` is needed: the SIMD flavours are `#[target_feature]`
//! functions called only after the CPU was checked. Work is split across cores by
//! [`par_rows`] on the engine's own [`pool`], whose threads spin during a forward pass and sleep
//! when there is nothing to do.
//!
//! This module knows nothing of models, tokenizers or candle tensors (candle appears only in
//! tests, as the reference every kernel is checked against).

pub mod dense;
pub mod ops;
pub mod packed;
pub mod pool;
pub mod quant;

use std::{ops::Range, sync::OnceLock};

/// The instruction-set flavour a kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust; every CPU.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX-512 F/BW/VL/DQ (and AVX2, FMA, F16C).
    Avx512,
}

/// Optional extensions some kernels use on top of their [`Isa`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extensions {
    /// AVX-512 VNNI (`vpdpbusd` on 512-bit registers).
    pub avx512_vnni: bool,
    /// AVX-VNNI (`vpdpbusd` on 256-bit registers, VEX encoded).
    pub avx_vnni: bool,
    /// AVX-512 BF16 (`vdpbf16ps`).
    pub avx512_bf16: bool,
}

impl Isa {
    /// The best flavour this CPU runs, detected once. `LMX_KERNELS=scalar|avx2|avx512` caps it
    /// (for tests and for comparing flavours in benchmarks); a cap above the CPU is ignored.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::best_supported();
            match std::env::var("LMX_KERNELS").ok().as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx2") => best.min(Isa::Avx2),
                _ => best,
            }
        })
    }

    pub(crate) fn best_supported() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq");
            if avx512 {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every flavour this CPU can run, lowest first (tests check each against the reference).
    pub fn all_supported() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| *isa <= Self::best_supported())
            .collect()
    }
}

impl Extensions {
    /// The extensions of this CPU, detected once.
    pub fn detect() -> Extensions {
        static EXT: OnceLock<Extensions> = OnceLock::new();
        *EXT.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                Extensions {
                    avx512_vnni: is_x86_feature_detected!("avx512vnni"),
                    avx_vnni: is_x86_feature_detected!("avxvnni"),
                    avx512_bf16: is_x86_feature_detected!("avx512bf16"),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                Extensions::default()
            }
        })
    }
}

/// A one-line description of the CPU and the kernels chosen for it (benchmarks print it).
pub fn describe_cpu() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let ext = Extensions::detect();
    format!(
        "{model}; {} threads; kernels {:?}{}{}{}",
        pool::threads(),
        Isa::detect(),
        if ext.avx512_vnni { " +avx512vnni" } else { "" },
        if ext.avx_vnni { " +avxvnni" } else { "" },
        if ext.avx512_bf16 { " +avx512bf16" } else { "" },
    )
}

/// A raw pointer that may cross threads: kernels hand each thread a disjoint set of output
/// indices and write through it. Whoever writes must keep to their own indices.
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);
// SAFETY: used only to write disjoint elements from different threads (see `par_rows`).
unsafe impl<T: Send> Send for SyncPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer to element `i` (a method, so closures capture the whole `SyncPtr`).
    ///
    /// # Safety
    /// `i` must be within the allocation the pointer points into.
    pub unsafe fn at(&self, i: usize) -> *mut T {
        // SAFETY: the caller keeps `i` in bounds.
        unsafe { self.0.add(i) }
    }
}

/// Asks for the cache lines of `data` to be brought into L2 ahead of use (x86-64; elsewhere
/// nothing). For data read soon after in an order the hardware prefetchers do not foresee,
/// such as the next sequence's keys and values in attention.
#[inline]
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let start = data.as_ptr().cast::<u8>();
        let bytes = std::mem::size_of_val(data);
        // From the line holding the first byte to the one holding the last.
        let skew = start as usize % 64;
        let mut at = 0;
        while at < bytes + skew {
            // SAFETY: a prefetch only hints the cache; the address is in or just before
            // `data` (the start of its first line), and prefetches never fault.
            unsafe {
                _mm_prefetch::<_MM_HINT_T1>(start.wrapping_sub(skew).wrapping_add(at).cast())
            };
            at += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Ranges a [`par_rows`] job is split into at most.
const MAX_RANGES: usize = 64;

/// Runs `f` over `0..rows` split into contiguous ranges (multiples of `grain`, except the
/// last) on the [`pool`], in guided order: each range takes `1 / (2 · threads)` of the rows
/// still left, so the first ranges are large (few claims) and the last ones small, and a
/// thread that finishes early waits for at most a small range of another's. (Equal ranges,
/// four per thread, left the threads of a batched decode step idle 11.4% of the time at the
/// ends of jobs and between them; these 9.8%, by `perf` samples of `benches/batch.rs`.) A small
/// job, under two grains per thread or under `min_work` total units (`rows * work_per_row`),
/// runs on the calling thread.
pub fn par_rows<F>(rows: usize, grain: usize, work_per_row: usize, f: F)
where
    F: Fn(Range<usize>) + Sync + Send,
{
    const MIN_PARALLEL_WORK: usize = 32 * 1024;
    let grain = grain.max(1);
    let threads = pool::threads();
    if threads == 1 || rows <= grain || rows.saturating_mul(work_per_row) < MIN_PARALLEL_WORK {
        f(0..rows);
        return;
    }
    let (bounds, count) = guided_bounds(rows, grain, threads);
    pool::run(count, &|c| f(bounds[c]..bounds[c + 1]));
}

/// The starts of [`par_rows`]'s ranges and the end (`bounds[..=count]`), and their count.
fn guided_bounds(rows: usize, grain: usize, threads: usize) -> ([usize; MAX_RANGES + 1], usize) {
    let mut bounds = [0usize; MAX_RANGES + 1];
    let mut count = 0;
    while bounds[count] < rows {
        let left = rows - bounds[count];
        let take = if count + 1 == MAX_RANGES {
            left
        } else {
            (left.div_ceil(2 * threads).div_ceil(grain) * grain).min(left)
        };
        bounds[count + 1] = bounds[count] + take;
        count += 1;
    }
    (bounds, count)
}

/// Deterministic pseudo-random values in `[-amplitude, amplitude)` (xorshift64), for the
/// kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u64, amplitude: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amplitude
        })
        .collect()
}

/// candle's `x · Wᵀ` for `n` rows of `x` and a row-major `rows × cols` W: the reference the
/// dense kernels are tested against.
#[cfg(test)]
pub(crate) fn candle_product(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f32> {
    use candle_core::{Device, Tensor};
    let w = Tensor::from_slice(w, (rows, cols), &Device::Cpu).unwrap();
    let x = Tensor::from_slice(&x[..n * cols], (n, cols), &Device::Cpu).unwrap();
    x.matmul(&w.t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn guided_ranges_shrink_to_a_grain_and_cover_the_rows() {
        for (rows, grain, threads) in [
            (36, 1, 2),
            (3072, 1, 2),
            (1001, 32, 2),
            (96, 2, 16),
            (1 << 19, 1, 2),
            // So many threads that the shares shrink slowly: the count runs out and the last
            // range takes the rest.
            (1 << 19, 1, 64),
        ] {
            let (bounds, count) = guided_bounds(rows, grain, threads);
            assert!(count <= MAX_RANGES);
            assert_eq!((bounds[0], bounds[count]), (0, rows));
            let sizes: Vec<usize> = bounds[..=count].windows(2).map(|w| w[1] - w[0]).collect();
            assert!(sizes.iter().all(|&s| s > 0), "{rows}/{grain}: {sizes:?}");
            assert!(
                bounds[..count].iter().all(|b| b % grain == 0),
                "{rows}/{grain}: {bounds:?}"
            );
            // Each range a share of what is left: never larger than the one before it (the
            // last may take all that remains when the count runs out).
            let capped = count == MAX_RANGES;
            assert_eq!(
                capped,
                threads == 64,
                "{rows}/{grain}/{threads}: {count} ranges"
            );
            let shrinking = &sizes[..sizes.len() - usize::from(capped)];
            assert!(
                shrinking.windows(2).all(|w| w[1] <= w[0]),
                "{rows}/{grain}: {sizes:?}"
            );
            assert!(sizes[0] <= rows.div_ceil(2 * threads).div_ceil(grain) * grain);
            if !capped {
                assert!(sizes[count - 1] <= grain, "{rows}/{grain}: {sizes:?}");
            }
        }
    }

    #[test]
    fn par_rows_covers_every_row_once_in_grain_aligned_ranges() {
        for (rows, grain, work) in [
            (0, 4, 1),
            (7, 4, 1_000_000),
            (1000, 16, 100),
            (1001, 32, 64),
        ] {
            let seen = Mutex::new(vec![0u8; rows]);
            par_rows(rows, grain, work, |range| {
                assert!(range.start % grain == 0, "{range:?} not aligned to {grain}");
                let mut seen = seen.lock().unwrap();
                for r in range {
                    seen[r] += 1;
                }
            });
            assert!(seen.into_inner().unwrap().iter().all(|&n| n == 1));
        }
    }

    #[test]
    fn detected_isa_is_among_the_supported() {
        assert!(Isa::all_supported().contains(&Isa::detect()));
        assert_eq!(Isa::all_supported()[0], Isa::Scalar);
    }
}
