//! Fuzz targets on the stable toolchain: proptest strategies drive the parsers of what comes from
//! a hub or a client (safetensors headers, GGUF, index JSON, model references, chat templates)
//! for a bounded time each. Every case must return (a watchdog fails a case that runs longer
//! than [`HANG`]), without panicking, and without any single allocation beyond a bound (a
//! per-thread counting allocator).
//!
//! The RNG seed is fixed, so CI runs the same cases every time; `LMX_FUZZ_SECS=600
//! LMX_FUZZ_SEED=N cargo test --test fuzz` hunts longer and elsewhere.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    fmt::Debug,
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use lmx::{
    engine::{ChatMessage, ChatTemplate, EngineError, TemplateLimits},
    manager::{
        cache::{parse_model_ref, repo_folder_name, ModelRef},
        reference::{self, Selector},
    },
    snapshot::check_file_bytes,
    testing,
};
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A case running longer than this is a hang.
const HANG: Duration = Duration::from_secs(20);

/// Seconds each target runs (the five together stay within 60 s, run in parallel or not).
fn budget() -> Duration {
    let secs = std::env::var("LMX_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    Duration::from_secs(secs)
}

/// Runs `check` on values of `strategy` until the budget is spent, each on a worker thread
/// watched for hangs; a case whose largest single allocation exceeds `max_alloc` fails.
fn fuzz<S, M, C>(name: &str, make: M, max_alloc: usize, check: C)
where
    S: Strategy,
    S::Value: Debug,
    M: FnOnce() -> S + Send + 'static,
    C: Fn(&S::Value) + Send + 'static,
{
    let seed = std::env::var("LMX_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0x6c6d_7866);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let budget = budget();
    let (tx, rx) = mpsc::channel::<Result<usize, String>>();
    let (case_tx, case_rx) = mpsc::channel::<String>();
    let worker = std::thread::Builder::new()
        .name(format!("fuzz-{name}"))
        .spawn(move || {
            let strategy = make();
            let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
            let mut runner = TestRunner::new_with_rng(Config::default(), rng);
            let started = Instant::now();
            let mut cases = 0usize;
            let mut slowest = (Duration::ZERO, String::new());
            while started.elapsed() < budget {
                let value = match strategy.new_tree(&mut runner) {
                    Ok(tree) => tree.current(),
                    Err(e) => {
                        let _ = tx.send(Err(format!("strategy failed: {e}")));
                        return;
                    }
                };
                let _ = case_tx.send(format!("{value:?}"));
                LARGEST.with(|l| l.set(0));
                let case_started = Instant::now();
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&value)));
                let largest = LARGEST.with(|l| l.get());
                if case_started.elapsed() > slowest.0 {
                    slowest = (case_started.elapsed(), format!("{value:?}"));
                }
                if outcome.is_err() {
                    let _ = tx.send(Err(format!("panicked on {value:?}")));
                    return;
                }
                if largest > max_alloc {
                    let _ = tx.send(Err(format!(
                        "allocated {largest} bytes at once on {value:?}"
                    )));
                    return;
                }
                cases += 1;
                let _ = tx.send(Ok(cases));
            }
            eprintln!("fuzz: slowest case {:?}: {:.200}", slowest.0, slowest.1);
        })
        .expect("fuzz worker");
    let mut last_case = String::new();
    let mut cases = 0;
    loop {
        match rx.recv_timeout(HANG) {
            Ok(Ok(n)) => cases = n,
            Ok(Err(failure)) => panic!("fuzz {name}: {failure}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                while let Ok(case) = case_rx.try_recv() {
                    last_case = case;
                }
                panic!("fuzz {name}: a case ran longer than {HANG:?}: {last_case}");
            }
        }
    }
    worker.join().expect("fuzz worker");
    assert!(cases > 0, "fuzz {name}: no case ran");
    eprintln!("fuzz {name}: {cases} cases");
}

/// Byte parsers: no input justifies more than this in one allocation.
const BYTES_BOUND: usize = 16 << 20;

/// Valid samples to mutate, and mutations: byte flips, a truncation, and a u64 spliced in at a
/// random place (counts and lengths are u64s in both formats).
fn mutated(samples: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = samples.len();
    (
        0..n,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        prop::option::of((any::<prop::sample::Index>(), any::<u64>())),
        prop::option::of(any::<prop::sample::Index>()),
    )
        .prop_map(move |(which, flips, splice, cut)| {
            let mut bytes = samples[which].clone();
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Some((at, value)) = splice {
                let i = at.index(bytes.len().saturating_sub(8).max(1));
                for (k, b) in value.to_le_bytes().iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(i + k) {
                        *slot = *b;
                    }
                }
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        })
}

/// A safetensors file from a header grammar: dtypes, shapes and offsets drawn freely (huge,
/// overlapping, overflowing), the length prefix right or wrong, data short or long.
fn safetensors() -> impl Strategy<Value = Vec<u8>> {
    let dtype = prop::sample::select(vec![
        "F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X",
    ]);
    let dim = prop_oneof![0u64..8, Just(u64::MAX), Just(1 << 40), any::<u64>()];
    let tensor = (
        "[a-z.]{0,12}",
        dtype,
        prop::collection::vec(dim, 0..4),
        (any::<u64>(), any::<u64>()),
        0u64..256,
    );
    (
        prop::collection::vec(tensor, 0..6),
        prop::option::of(any::<u64>()),
        0usize..512,
        any::<bool>(),
    )
        .prop_map(|(tensors, prefix, data, metadata)| {
            let mut header = serde_json::Map::new();
            if metadata {
                header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
            }
            for (name, dtype, shape, (start, end), small) in tensors {
                let offsets = if small % 2 == 0 {
                    vec![small, small + 16]
                } else {
                    vec![start, end]
                };
                header.insert(
                    name,
                    serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": offsets}),
                );
            }
            let header = serde_json::to_vec(&header).unwrap_or_default();
            let len = prefix.unwrap_or(header.len() as u64);
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(&header);
            bytes.extend(std::iter::repeat_n(0u8, data));
            bytes
        })
}

fn check_bytes(name: &str, bytes: &[u8]) {
    if let Err(problem) = check_file_bytes(name, bytes) {
        assert!(!problem.detail.is_empty(), "a problem names what is wrong");
    }
}

#[test]
fn fuzz_safetensors_headers() {
    let samples = vec![testing::safetensors_file(
        &[("a".into(), 8), ("b".into(), 3)],
        1,
    )];
    let strategy = move || prop_oneof![safetensors(), mutated(samples)];
    fuzz("safetensors", strategy, BYTES_BOUND, |bytes| {
        check_bytes("model.safetensors", bytes)
    });
}

#[test]
fn fuzz_gguf_reader() {
    let samples = vec![
        testing::gguf_file(true),
        testing::gguf_file(false),
        testing::tiny::spm_llama_gguf(1),
    ];
    let strategy = move || {
        prop_oneof![
            mutated(samples),
            prop::collection::vec(any::<u8>(), 0..256).prop_map(|tail| {
                let mut b = b"GGUF\x03\0\0\0".to_vec();
                b.extend(tail);
                b
            }),
        ]
    };
    fuzz("gguf", strategy, BYTES_BOUND, |bytes| {
        check_bytes("model.gguf", bytes);
        // The engine reads the same header with candle before loading.
        let _ = candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(bytes));
    });
}

/// Index files: weight maps whose targets are shard names, paths out of the folder, huge
/// strings or not strings at all; plus mutations of a valid index.
fn index_json() -> impl Strategy<Value = Vec<u8>> {
    let target = prop_oneof![
        Just(serde_json::json!("model-00001-of-00002.safetensors")),
        Just(serde_json::json!("../../etc/passwd")),
        Just(serde_json::json!("/etc/passwd")),
        Just(serde_json::json!(
            "model-00001-of-99999999999999999999.safetensors"
        )),
        Just(serde_json::json!("a\\..\\b")),
        Just(serde_json::json!(null)),
        Just(serde_json::json!(["x"])),
        "[ -~]{0,40}".prop_map(serde_json::Value::from),
    ];
    let map = prop::collection::btree_map("[a-z.]{0,10}", target, 0..8);
    let valid = br#"{"metadata":{"total_size":44},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#.to_vec();
    prop_oneof![
        (map, any::<Option<i64>>()).prop_map(|(map, total)| {
            serde_json::to_vec(
                &serde_json::json!({"metadata": {"total_size": total}, "weight_map": map}),
            )
            .unwrap_or_default()
        }),
        mutated(vec![valid]),
        prop::collection::vec(
            prop::sample::select(b"{}[]\",:0 weight_map".to_vec()),
            0..256
        ),
    ]
}

#[test]
fn fuzz_index_json() {
    fuzz("index", index_json, BYTES_BOUND, |bytes| {
        check_bytes("model.safetensors.index.json", bytes)
    });
}

/// The model-reference grammar: whatever the strings, parsing returns, a repository id never
/// names a folder outside the cache, and a folder path never holds `.` or `..` segments.
fn model_ref() -> impl Strategy<Value = (String, String)> {
    let piece = prop_oneof![
        Just("/".to_owned()),
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("@".to_owned()),
        Just(":".to_owned()),
        Just(".gguf".to_owned()),
        Just("Q4_K_M".to_owned()),
        Just("--".to_owned()),
        Just("\\".to_owned()),
        Just("\0".to_owned()),
        Just("org".to_owned()),
        Just("name".to_owned()),
        "[a-zA-Z0-9_.-]{1,8}",
        any::<String>(),
    ];
    let spec = prop::collection::vec(piece, 0..8).prop_map(|p| p.concat());
    (spec.clone(), spec)
}

#[test]
fn fuzz_model_references() {
    fuzz("model-ref", model_ref, 1 << 20, |(id, rev)| {
        let (split_id, split_rev) = reference::split(id);
        for (id, rev) in [(id.as_str(), rev.as_str()), (&split_id, &split_rev)] {
            match parse_model_ref(id, rev) {
                Ok(ModelRef::Hub {
                    repo_id,
                    revision,
                    selector,
                }) => {
                    // A file selector is a safe relative path inside the snapshot.
                    if let Some(Selector::File(file)) = &selector {
                        assert!(
                            Path::new(file)
                                .components()
                                .all(|c| matches!(c, std::path::Component::Normal(_))),
                            "{file}"
                        );
                    }
                    let folder = repo_folder_name(&repo_id);
                    assert!(!folder.contains('/') && !folder.contains(".."), "{folder}");
                    let joined = Path::new("/cache")
                        .join(&folder)
                        .join("refs")
                        .join(&revision);
                    assert!(
                        joined.components().all(|c| !matches!(
                            c,
                            std::path::Component::ParentDir | std::path::Component::CurDir
                        )),
                        "{}",
                        joined.display()
                    );
                }
                Ok(ModelRef::Local(path)) => {
                    assert!(path.is_absolute());
                    assert!(path
                        .components()
                        .all(|c| !matches!(c, std::path::Component::ParentDir)));
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
    });
}

/// Template fragments: loops over big ranges, recursion, string and list growth, filters,
/// pycompat methods, and plain text; stitched together at random (most do not compile).
fn template() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        Just("{% for i in range(100000) %}".to_owned()),
        Just("{% for m in messages %}".to_owned()),
        Just("{% endfor %}".to_owned()),
        Just("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}".to_owned()),
        Just("{% macro g(s) %}{{ g(s ~ s) }}{% endmacro %}{{ g('ab') }}".to_owned()),
        Just("{{ 'x' * 100000000 }}".to_owned()),
        Just("{% set s = 'y' * 1000000 %}{{ s ~ s ~ s }}".to_owned()),
        Just("{{ range(100000) | list | join(',') }}".to_owned()),
        Just("{{ messages | tojson }}".to_owned()),
        Just("{{ 'a' | indent(100000000) }}".to_owned()),
        Just("{{ 'abc'.center(100000000) }}".to_owned()),
        Just("{{ 'a b'.split() * 10000000 }}".to_owned()),
        Just("{{ [1] * 100000000 }}".to_owned()),
        Just("{{ raise_exception('no') }}".to_owned()),
        Just("{% if add_generation_prompt %}".to_owned()),
        Just("{% endif %}".to_owned()),
        Just("{{ m.content }}".to_owned()),
        Just("{{ bos_token }}".to_owned()),
        Just("{% break %}".to_owned()),
        "[ -~]{0,12}",
    ];
    prop::collection::vec(fragment, 1..8).prop_map(|f| f.concat())
}

#[test]
fn fuzz_chat_templates() {
    // A smaller fuel than the server's (more cases per second; the bound works the same way at
    // any fuel): one allocation may not exceed what the fuel pays for, plus the output cap.
    let limits = TemplateLimits {
        fuel: 100_000,
        ..TemplateLimits::default()
    };
    fuzz(
        "chat-template",
        template,
        (limits.fuel as usize) * 64 * 2 + limits.max_output_bytes,
        move |source| {
            let messages: Vec<ChatMessage> = (0..4)
                .map(|i| ChatMessage {
                    role: ["system", "user", "assistant", "user"][i].into(),
                    content: "hello ".repeat(i + 1),
                })
                .collect();
            match ChatTemplate::with_limits(source.clone(), Some("<s>".into()), None, limits) {
                Ok(t) => match t.render(&messages, true) {
                    Ok(out) => assert!(out.len() <= limits.max_output_bytes),
                    Err(EngineError::TemplateLimit(_))
                    | Err(EngineError::Validation { .. })
                    | Err(EngineError::Template(_)) => {}
                    Err(other) => panic!("unexpected error {other:?}"),
                },
                Err(EngineError::Load(_) | EngineError::TemplateLimit(_)) => {}
                Err(other) => panic!("unexpected error {other:?}"),
            }
        },
    );
}
