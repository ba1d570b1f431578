//! Quantized matrix kernels against candle's `QMatMul` on the same weights, in the same run
//! (a bench binary: `cargo bench --bench kernels`).
//!
//! Shapes are SmolLM2-135M's (hidden 576, ffn 1536, vocab 49152): attention and FFN weights and
//! the tied output head. For every GGUF kind whose blocks divide the columns: decode (one
//! activation row) and prefill (128 rows). Printed: GFLOP/s and GB/s of weights read for lmx
//! and candle, and the speed ratio lmx / candle; for the kinds that this CPU runs in
//! interleaved panels (`quant::Interleaved`, as the native model loads them), the same for the
//! panel kernel. `LMX_KERNELS=scalar|avx2` caps lmx's flavour;
//! `RAYON_NUM_THREADS` sets the threads of both. `BENCH_SECS` sets the time spent per figure
//! (default 0.3); `BENCH_ONLY=substring` keeps the lines whose shape, kind and mode
//! (`"head 49152x576 Q4_1 decode"`, `prefill`) contain it. `BENCH_TOKENS=1,8,16,128` sets the
//! activation rows measured (default `1,128`; rows above 1 are "prefill").

use std::time::{Duration, Instant};

use candle_core::{
    quantized::{GgmlDType, QMatMul, QTensor},
    Device, Module, Tensor,
};
use lmx::engine::kernels::{
    self,
    quant::{self, Interleaved, QuantKind, QuantScratch},
};

const SHAPES: [(&str, usize, usize); 4] = [
    ("attn 576x576", 576, 576),
    ("ffn up 1536x576", 1536, 576),
    ("ffn down 576x1536", 576, 1536),
    ("head 49152x576", 49152, 576),
];

const KINDS: [(QuantKind, GgmlDType); 8] = [
    (QuantKind::Q4_0, GgmlDType::Q4_0),
    (QuantKind::Q4_1, GgmlDType::Q4_1),
    (QuantKind::Q5_0, GgmlDType::Q5_0),
    (QuantKind::Q5_1, GgmlDType::Q5_1),
    (QuantKind::Q8_0, GgmlDType::Q8_0),
    (QuantKind::Q4K, GgmlDType::Q4K),
    (QuantKind::Q5K, GgmlDType::Q5K),
    (QuantKind::Q6K, GgmlDType::Q6K),
];

/// Deterministic values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Time of one call: the fastest of batches that each take about a tenth of the budget (the
/// least disturbed by other work on the machine).
fn time(budget: Duration, mut f: impl FnMut()) -> Duration {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().max(Duration::from_nanos(100));
    let per_batch = ((budget.as_secs_f64() / 10.0 / once.as_secs_f64()) as u32).max(1);
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 3 || start.elapsed() < budget {
        let t = Instant::now();
        for _ in 0..per_batch {
            f();
        }
        samples.push(t.elapsed() / per_batch);
    }
    samples.into_iter().min().unwrap_or_default()
}

fn main() {
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let budget = Duration::from_secs_f64(
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.3),
    );
    let tokens: Vec<usize> = std::env::var("BENCH_TOKENS")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![1, 128]);
    println!("{}", kernels::describe_cpu());
    println!(
        "{:<18} {:<5} {:>7}  {:>16} {:>16}  {:>6}  {:>16} {:>6}",
        "shape", "kind", "tokens", "lmx GFLOP/s GB/s", "candle", "ratio", "panels", "ratio"
    );
    for (name, rows, cols) in SHAPES {
        let w = Tensor::from_vec(values(rows * cols, 7), (rows, cols), &Device::Cpu).unwrap();
        for (kind, dtype) in KINDS {
            let mode = |n: usize| if n == 1 { "decode" } else { "prefill" };
            let wanted = |n: usize| format!("{name} {kind:?} {}", mode(n)).contains(&only);
            if cols % kind.block_elems() != 0 || !tokens.iter().any(|&n| wanted(n)) {
                continue;
            }
            let qtensor = QTensor::quantize(&w, dtype).unwrap();
            let bytes = qtensor.data().unwrap().into_owned();
            let qmatmul = QMatMul::from_qtensor(qtensor).unwrap();
            let panels =
                Interleaved::pays(kind).then(|| Interleaved::pack(kind, &bytes, rows, cols));
            for n in tokens.iter().copied().filter(|&n| wanted(n)) {
                let x = values(n * cols, 11 + n as u64);
                let xt = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap();
                let mut y = vec![0f32; n * rows];
                let mut scratch = QuantScratch::default();
                let ours = kernels::pool::session(|| {
                    time(budget, || {
                        quant::matmul(kind, &bytes, rows, cols, &x, n, &mut y, &mut scratch)
                    })
                });
                let theirs = time(budget, || {
                    std::hint::black_box(qmatmul.forward(&xt).unwrap());
                });
                let interleaved = panels.as_ref().map(|p| {
                    kernels::pool::session(|| {
                        time(budget, || {
                            quant::matmul_interleaved(p, &x, n, &mut y, &mut scratch)
                        })
                    })
                });
                let flop = 2.0 * (rows * cols * n) as f64;
                let gbytes = bytes.len() as f64 / 1e9;
                let fig = |t: Duration| {
                    let s = t.as_secs_f64();
                    format!("{:>7.1} {:>7.1}", flop / s / 1e9, gbytes / s)
                };
                let (panels_fig, panels_ratio) = match interleaved {
                    Some(t) => (
                        fig(t),
                        format!("{:.2}x", theirs.as_secs_f64() / t.as_secs_f64()),
                    ),
                    None => ("-".into(), "-".into()),
                };
                println!(
                    "{:<18} {:<5} {:>7}  {} {}  {:>5.2}x  {:>16} {:>6}",
                    name,
                    format!("{kind:?}"),
                    n,
                    fig(ours),
                    fig(theirs),
                    theirs.as_secs_f64() / ours.as_secs_f64(),
                    panels_fig,
                    panels_ratio
                );
            }
        }
    }
}
