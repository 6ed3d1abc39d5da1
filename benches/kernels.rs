//! phi4's quantized matrix kernels against ggml's: one Phi-4-sized weight matrix times a step
//! of M tokens, per weight type, through each side's ggml graph on the same threads.
//!
//!     cargo bench --bench kernels -- [--threads 2] [--rows 17920] [--k 5120] [--rounds 3]
//!         [--types q4_K,q5_K,...] [--m 1,2,4,8,16,64,512]
//!     cargo bench --bench kernels -- --model FILE [--threads 2] [--rounds 3] [--m 1,2,4,8,16]
//!
//! With `--model`: a whole forward step of M tokens of one session (at a short context) on the
//! model loaded for phi4's kernels, then for ggml's (`PHI4_KERNELS=ggml`, one model in memory at
//! a time), each as the cost of one step of 1 token and of M.
//!
//! Prints ms per step (best of the rounds; the two sides alternate within each round), the
//! weight bytes read per second (their file size / step time: the figure to hold against the
//! machine's read bandwidth at M = 1), and GMAC/s (rows × k × M multiply-adds per second: the
//! figure to hold against the ISA's peak at large M). ggml's side repacks the weights where it
//! has a faster layout for the type (as the model does), else runs them as stored.

use std::time::Instant;

use phi4::gguf::quantize;
use phi4::matmul::{Kernels, Product, KERNEL_TYPES};

fn main() {
    let mut threads = 2;
    let mut model = None;
    let (mut rows, mut k, mut rounds) = (17920usize, 5120usize, 3usize);
    let mut types = KERNEL_TYPES.to_vec();
    let mut ms: Vec<usize> = vec![1, 2, 4, 8, 16, 64, 512];
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--threads" => threads = v().parse().unwrap(),
            "--rows" => rows = v().parse().unwrap(),
            "--k" => k = v().parse().unwrap(),
            "--rounds" => rounds = v().parse().unwrap(),
            "--m" => ms = v().split(',').map(|s| s.parse().unwrap()).collect(),
            "--types" => {
                types = v()
                    .split(',')
                    .map(|s| {
                        *KERNEL_TYPES
                            .iter()
                            .find(|t| t.name() == s)
                            .unwrap_or_else(|| panic!("unknown type {s}"))
                    })
                    .collect()
            }
            "--model" => model = Some(std::path::PathBuf::from(v())),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    if let Some(path) = model {
        return steps(&path, threads, rounds, &ms);
    }
    println!(
        "weights [{k}, {rows}], {threads} threads, CPU kernels {}, best of {rounds} alternating rounds",
        phi4::cpu_variant()
    );
    println!(
        "{:<6} {:>5} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "type",
        "M",
        "phi4 ms",
        "ggml ms",
        "ggml/phi4",
        "phi4 GB/s",
        "ggml GB/s",
        "phi4 GMAC",
        "ggml GMAC",
        "step/M=1"
    );
    let mut seed = 1u64;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let w: Vec<f32> = (0..rows * k).map(|_| rand()).collect();
    let max_m = *ms.iter().max().unwrap();
    let x: Vec<f32> = (0..max_m * k).map(|_| rand()).collect();
    for ty in types {
        let bytes = quantize(ty, &w, k).unwrap();
        let mut ours = Product::new(ty, rows, k, &bytes, Kernels::Phi4, threads).unwrap();
        let mut theirs = Product::new(ty, rows, k, &bytes, Kernels::GgmlRepacked, threads).unwrap();
        let mut one = f64::NAN;
        for &m in &ms {
            let x = &x[..m * k];
            // Enough runs per round for about a quarter of a second of work.
            let mut best = [f64::INFINITY; 2];
            let t = Instant::now();
            ours.run(x, m);
            let reps = ((0.25 / t.elapsed().as_secs_f64()) as usize).clamp(1, 50);
            for _ in 0..rounds {
                for (side, p) in [&mut ours, &mut theirs].into_iter().enumerate() {
                    p.run(x, m); // warm
                    let t = Instant::now();
                    for _ in 0..reps {
                        std::hint::black_box(p.run(x, m));
                    }
                    best[side] = best[side].min(t.elapsed().as_secs_f64() / reps as f64);
                }
            }
            if m == 1 {
                one = best[0];
            }
            let gbs = |s: f64| bytes.len() as f64 / s / 1e9;
            let gmac = |s: f64| (rows * k * m) as f64 / s / 1e9;
            println!(
                "{:<6} {:>5} {:>10.3} {:>10.3} {:>9.2} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.2}",
                format!("{ty:?}"),
                m,
                best[0] * 1e3,
                best[1] * 1e3,
                best[1] / best[0],
                gbs(best[0]),
                gbs(best[1]),
                gmac(best[0]),
                gmac(best[1]),
                best[0] / one
            );
        }
    }
}

/// Best time of a step of `m` tokens on `s` (rewound after each, so every step starts at the
/// same position).
fn step_time(s: &mut phi4::Session, m: usize, rounds: usize) -> f64 {
    let tokens: Vec<u32> = (0..m as u32).map(|i| 100 + 7 * i).collect();
    let base = s.history().len();
    let mut best = f64::INFINITY;
    for _ in 0..rounds + 1 {
        let t = Instant::now();
        s.evaluate(&tokens).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        s.rewind(base);
    }
    best
}

fn steps(path: &std::path::Path, threads: usize, rounds: usize, ms: &[usize]) {
    use std::sync::Arc;
    println!(
        "{}: a step of M tokens, {threads} threads, CPU kernels {}, best of {rounds}",
        path.display(),
        phi4::cpu_variant()
    );
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    for kernels in ["phi4", "ggml"] {
        // SAFETY of the environment: this benchmark is single-threaded here.
        std::env::set_var("PHI4_KERNELS", kernels);
        let t = Instant::now();
        let model = Arc::new(phi4::Model::load(path, Default::default()).unwrap());
        println!(
            "{kernels}: loaded in {:.1} s ({})",
            t.elapsed().as_secs_f64(),
            model.repacked_summary()
        );
        let mut s = phi4::Session::new(
            model,
            &phi4::SessionParams {
                n_ctx: 1024,
                n_batch: 512,
                n_threads: threads,
                ..Default::default()
            },
        )
        .unwrap();
        s.evaluate(&[1, 2, 3, 4]).unwrap(); // a short context, warm
        rows.push((
            kernels.into(),
            ms.iter().map(|&m| step_time(&mut s, m, rounds)).collect(),
        ));
    }
    println!(
        "{:>5} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "M", "phi4 ms", "ggml ms", "ggml/phi4", "phi4 /M=1", "ggml /M=1"
    );
    for (i, m) in ms.iter().enumerate() {
        let (a, b) = (rows[0].1[i], rows[1].1[i]);
        println!(
            "{m:>5} {:>12.1} {:>12.1} {:>10.2} {:>10.2} {:>10.2}",
            a * 1e3,
            b * 1e3,
            b / a,
            a / rows[0].1[0],
            b / rows[1].1[0]
        );
    }
}
