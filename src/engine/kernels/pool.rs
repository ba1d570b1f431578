//! The forward pass's own thread pool: the calling thread and `threads - 1` workers share each
//! product's chunks, claimed one at a time from one atomic word.
//!
//! A forward pass posts several hundred jobs of 10–100 µs each (six products and a few
//! row-wise ops per layer). rayon's workers go to sleep on a futex between such jobs and every
//! job wakes them again; on a 2-core VM `perf` put 15–20% of a batched decode step in those
//! wake-ups and context switches. Here, while a [`session`] runs (one forward pass, or a
//! prompt's chunks), the workers spin on the job word, so a new job starts on every core within
//! a few hundred nanoseconds; when the session ends they spin on a little longer (a decode
//! loop starts its next pass soon) and then park, so an idle server uses no CPU. This is how
//! llama.cpp's ggml threadpool works too.
//!
//! Chunks are claimed dynamically, so a worker the OS has descheduled delays nothing but its
//! own claimed chunk. A second thread that starts a session while another one holds the pool
//! (two models decoding at once, tests in parallel) runs its jobs on its own thread instead of
//! waiting.

use std::{
    cell::{Cell, UnsafeCell},
    panic::{catch_unwind, resume_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Condvar, Mutex, OnceLock, TryLockError,
    },
    time::{Duration, Instant},
};

/// How long workers keep spinning after a session ends before they park.
const LINGER: Duration = Duration::from_micros(300);

/// The job word: epoch (24 bits) | chunks (20 bits) | next unclaimed chunk (20 bits).
const INDEX_BITS: u32 = 20;
const MAX_CHUNKS: usize = (1 << (INDEX_BITS - 1)) - 1;

fn pack(epoch: u64, chunks: usize, next: usize) -> u64 {
    (epoch & 0xFF_FFFF) << (2 * INDEX_BITS) | (chunks as u64) << INDEX_BITS | next as u64
}

fn unpack(word: u64) -> (u64, usize, usize) {
    let mask = (1u64 << INDEX_BITS) - 1;
    (
        word >> (2 * INDEX_BITS),
        ((word >> INDEX_BITS) & mask) as usize,
        (word & mask) as usize,
    )
}

/// A job's closure, its lifetime erased: the poster does not return before every claimed chunk
/// is done, and a chunk can only be claimed while some are unclaimed.
type JobRef = *const (dyn Fn(usize) + Sync);

struct Shared {
    word: AtomicU64,
    /// Chunks of the current job finished (run or panicked).
    done: AtomicUsize,
    job: UnsafeCell<Option<JobRef>>,
    panicked: AtomicBool,
    /// A session is running: workers spin instead of parking.
    awake: AtomicBool,
    /// When the last session ended (nanoseconds since `start`), for the linger.
    ended_at: AtomicU64,
    start: Instant,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            word: AtomicU64::new(pack(0, 0, 0)),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            panicked: AtomicBool::new(false),
            awake: AtomicBool::new(false),
            ended_at: AtomicU64::new(0),
            start: Instant::now(),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }
}

/// A running session: workers spin while it lives, and when it ends, also by a panic, they
/// linger and then park (a session left "awake" would keep every worker spinning on an idle
/// server).
struct Awake<'a>(&'a Shared);

impl<'a> Awake<'a> {
    fn begin(shared: &'a Shared) -> Awake<'a> {
        shared.awake.store(true, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        Awake(shared)
    }
}

impl Drop for Awake<'_> {
    fn drop(&mut self) {
        let shared = self.0;
        shared
            .ended_at
            .store(shared.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        shared.awake.store(false, Ordering::SeqCst);
    }
}

// SAFETY: `job` is written only by the pool's owner while no chunk of a job is claimable
// (before the word publishes it), and read by a thread only after it claimed a chunk of that
// job, which keeps the owner from writing it again until that chunk is done.
unsafe impl Sync for Shared {}

struct Pool {
    shared: &'static Shared,
    threads: usize,
    owner: Mutex<()>,
}

thread_local! {
    /// What this thread's jobs do: 0 outside a session, 1 post to the pool (it owns it),
    /// 2 run on this thread (another thread owns the pool).
    static MODE: Cell<u8> = const { Cell::new(0) };
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        // RAYON_NUM_THREADS (as candle's code paths on rayon), else every core.
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1);
        let shared: &'static Shared = Box::leak(Box::new(Shared::new()));
        let mut threads_started = 1;
        for i in 1..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("lmx-kernel-{i}"))
                .spawn(move || worker(shared));
            if spawned.is_ok() {
                threads_started += 1;
            }
        }
        Pool {
            shared,
            threads: threads_started,
            owner: Mutex::new(()),
        }
    })
}

/// The number of threads a job's chunks are shared among (the caller included).
pub fn threads() -> usize {
    pool().threads
}

/// Claims and runs chunks of whatever job the word holds until none is left; returns the
/// epoch the last claim saw.
fn claim_and_run(shared: &Shared) -> u64 {
    loop {
        let (epoch, chunks, index) = unpack(shared.word.fetch_add(1, Ordering::AcqRel));
        if index >= chunks {
            return epoch;
        }
        // SAFETY: chunk `index` of this job is claimed and not done, so the job's poster is
        // still waiting and its closure alive (see `JobRef`).
        let job = unsafe { (*shared.job.get()).expect("a posted job") };
        // Jobs posted from inside a chunk run on the thread that posts them.
        let _mode = ModeGuard::set(2);
        // SAFETY: as above.
        let run = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(index) }));
        if run.is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.done.fetch_add(1, Ordering::Release);
    }
}

fn worker(shared: &'static Shared) {
    let mut seen = unpack(shared.word.load(Ordering::Acquire)).0;
    loop {
        let mut spins = 0u32;
        loop {
            let (epoch, _, _) = unpack(shared.word.load(Ordering::Acquire));
            if epoch != seen {
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && !shared.awake.load(Ordering::Relaxed) {
                let ended = shared.ended_at.load(Ordering::Relaxed);
                let now = shared.start.elapsed().as_nanos() as u64;
                if now.saturating_sub(ended) > LINGER.as_nanos() as u64 {
                    park(shared, seen);
                }
            }
            std::hint::spin_loop();
        }
        seen = claim_and_run(shared);
    }
}

/// Sleeps until a session starts (or a job newer than `seen` is posted).
fn park(shared: &Shared, seen: u64) {
    let mut guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
    shared.sleepers.fetch_add(1, Ordering::SeqCst);
    while !shared.awake.load(Ordering::SeqCst)
        && unpack(shared.word.load(Ordering::SeqCst)).0 == seen
    {
        guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
    }
    shared.sleepers.fetch_sub(1, Ordering::SeqCst);
}

/// Runs `f` as one session: the pool's workers spin between its jobs instead of sleeping.
/// Nested sessions are part of the outer one; a session started while another thread holds the
/// pool runs its jobs on the calling thread.
pub fn session<R>(f: impl FnOnce() -> R) -> R {
    if MODE.with(Cell::get) != 0 {
        return f();
    }
    let pool = pool();
    let owned = match pool.owner.try_lock() {
        Ok(guard) => guard,
        // A panic in an earlier session poisoned the lock; the pool itself is sound.
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => {
            let _mode = ModeGuard::set(2);
            return f();
        }
    };
    let out = {
        let _awake = Awake::begin(pool.shared);
        let _mode = ModeGuard::set(1);
        f()
    };
    drop(owned);
    out
}

/// Restores [`MODE`] when a session or a chunk ends, also by a panic.
struct ModeGuard(u8);

impl ModeGuard {
    fn set(mode: u8) -> ModeGuard {
        ModeGuard(MODE.with(|m| m.replace(mode)))
    }
}

impl Drop for ModeGuard {
    fn drop(&mut self) {
        MODE.with(|m| m.set(self.0));
    }
}

/// Runs `f(i)` for every `i` in `0..chunks`, shared among the pool's threads when this thread
/// owns the pool (outside a session, in a session of its own), else on this thread. Returns
/// when all are done; a panic in any chunk is raised here after the others finished.
pub fn run(chunks: usize, f: &(dyn Fn(usize) + Sync)) {
    match MODE.with(Cell::get) {
        0 => return session(|| run(chunks, f)),
        1 if chunks > 1 && chunks <= MAX_CHUNKS && pool().threads > 1 => {}
        _ => {
            (0..chunks).for_each(f);
            return;
        }
    }
    let shared = pool().shared;
    // SAFETY: this thread owns the pool and the previous job is done (every poster waits for
    // its chunks), so no thread reads `job` now.
    unsafe {
        *shared.job.get() = Some(std::mem::transmute::<
            *const (dyn Fn(usize) + Sync + '_),
            JobRef,
        >(f as *const _));
    }
    shared.done.store(0, Ordering::Relaxed);
    let epoch = unpack(shared.word.load(Ordering::Relaxed)).0 + 1;
    shared.word.store(pack(epoch, chunks, 0), Ordering::Release);
    claim_and_run(shared);
    while shared.done.load(Ordering::Acquire) < chunks {
        std::hint::spin_loop();
    }
    // SAFETY: as above; every chunk is done.
    unsafe { *shared.job.get() = None };
    if shared.panicked.swap(false, Ordering::Relaxed) {
        resume_unwind(Box::new("a kernel job panicked"));
    }
}

/// Runs `f(i, chunk)` on each consecutive chunk of `size` elements of `data` (the last may be
/// shorter), shared among the pool's threads (see [`run`]).
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let size = size.max(1);
    let (base, len) = (super::SyncPtr(data.as_mut_ptr()), data.len());
    run(len.div_ceil(size), &|i| {
        let start = i * size;
        assert!(start < len);
        // SAFETY: `run` calls each index once, so chunk i, within `data`, is borrowed by one
        // call only, and `data` stays borrowed until `run` returns.
        let chunk =
            unsafe { std::slice::from_raw_parts_mut(base.at(start), size.min(len - start)) };
        f(i, chunk)
    });
}

/// Runs `f` on every item, shared among the pool's threads (see [`run`]).
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    for_each_chunk_mut(items, 1, |_, item| f(&mut item[0]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_once_across_sessions_and_threads() {
        let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        let callers: Vec<_> = (0..3)
            .map(|_| {
                let hits = &hits;
                move || {
                    for round in 0..50 {
                        session(|| {
                            for job in 0..4 {
                                let n = 1 + (round * 7 + job * 13) % 200;
                                run(n, &|i| {
                                    hits[i].fetch_add(1, Ordering::Relaxed);
                                });
                            }
                        });
                    }
                }
            })
            .collect();
        std::thread::scope(|s| {
            for c in callers {
                s.spawn(c);
            }
        });
        let expected: Vec<usize> = (0..1000)
            .map(|i| {
                let mut count = 0;
                for round in 0..50 {
                    for job in 0..4 {
                        if i < 1 + (round * 7 + job * 13) % 200 {
                            count += 1;
                        }
                    }
                }
                3 * count
            })
            .collect();
        let got: Vec<usize> = hits.iter().map(|h| h.load(Ordering::Relaxed)).collect();
        assert_eq!(got, expected);
    }

    /// Runs `f` in a session that owns the pool (other tests may hold it for a while).
    fn owned_session(f: impl Fn()) {
        loop {
            let owned = session(|| {
                let owned = MODE.with(Cell::get) == 1;
                if owned {
                    f();
                }
                owned
            });
            if owned {
                return;
            }
            std::thread::yield_now();
        }
    }

    #[test]
    fn jobs_posted_from_inside_a_chunk_run_whole_on_that_thread() {
        let hits: Vec<AtomicUsize> = (0..64 * 64).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..20 {
            owned_session(|| {
                run(64, &|outer| {
                    run(64, &|inner| {
                        hits[outer * 64 + inner].fetch_add(1, Ordering::Relaxed);
                    })
                })
            });
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 20));
    }

    #[test]
    fn items_are_each_visited_once_and_jobs_outside_sessions_run() {
        let mut items: Vec<u64> = (0..97).collect();
        for_each_mut(&mut items, |v| *v = *v * 3 + 1);
        assert_eq!(items, (0..97).map(|v| v * 3 + 1).collect::<Vec<u64>>());
        // Chunks of 10: the last holds 7, and each knows its index.
        for_each_chunk_mut(&mut items, 10, |i, chunk| {
            assert_eq!(chunk.len(), if i == 9 { 7 } else { 10 });
            chunk.iter_mut().for_each(|v| *v = i as u64);
        });
        assert_eq!(items, (0..97).map(|v| v / 10).collect::<Vec<u64>>());
    }

    #[test]
    fn a_panicking_chunk_is_raised_to_the_caller_and_the_pool_still_works() {
        let caught = catch_unwind(|| {
            owned_session(|| {
                run(64, &|i| {
                    if i == 37 {
                        panic!("chunk 37");
                    }
                })
            })
        });
        assert!(caught.is_err());
        // A panic out of a session's own code leaves the pool usable too.
        assert!(catch_unwind(|| session(|| panic!("in the session"))).is_err());
        let sum = AtomicUsize::new(0);
        run(100, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }

    #[test]
    fn a_session_that_panics_still_lets_the_workers_park() {
        let shared = Shared::new();
        let caught = catch_unwind(AssertUnwindSafe(|| {
            let _awake = Awake::begin(&shared);
            assert!(shared.awake.load(Ordering::SeqCst));
            panic!("in the session");
        }));
        assert!(caught.is_err());
        assert!(
            !shared.awake.load(Ordering::SeqCst),
            "workers would spin forever"
        );
        assert!(shared.ended_at.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn the_job_word_round_trips() {
        for (e, c, i) in [
            (0, 0, 0),
            (5, 1000, 999),
            (0xFF_FFFF, MAX_CHUNKS, MAX_CHUNKS + 8),
        ] {
            assert_eq!(unpack(pack(e, c, i)), (e, c, i));
        }
        // The epoch wraps without touching the other fields.
        assert_eq!(unpack(pack(0x100_0001, 3, 2)), (1, 3, 2));
    }
}
