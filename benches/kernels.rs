//! phi4's quantized matrix kernels against ggml's: one Phi-4-sized weight matrix times a step
//! of M tokens, per weight type, through each side's ggml graph on the same threads.
//!
//!     cargo bench --bench kernels -- [--threads 2] [--rows 17920] [--k 5120] [--rounds 3]
//!         [--types q4_K,q5_K,q6_K] [--m 1,2,4,8,16,64,512]
//!
//! Prints ms per step (best of the rounds; the two sides alternate within each round), the
//! weight bytes read per second (their file size / step time: the figure to hold against the
//! machine's read bandwidth at M = 1), and GMAC/s (rows × k × M multiply-adds per second: the
//! figure to hold against the ISA's peak at large M). ggml's side repacks the weights where it
//! has a faster layout for the type (as the model does), else runs them as stored.

use std::time::Instant;

use phi4::gguf::{quantize, TensorType};
use phi4::matmul::{Kernels, Product};

fn main() {
    let mut threads = 2;
    let (mut rows, mut k, mut rounds) = (17920usize, 5120usize, 3usize);
    let mut types = vec![TensorType::Q4_K, TensorType::Q5_K, TensorType::Q6_K];
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
                    .map(|s| match s {
                        "q4_K" => TensorType::Q4_K,
                        "q5_K" => TensorType::Q5_K,
                        "q6_K" => TensorType::Q6_K,
                        other => panic!("unknown type {other}"),
                    })
                    .collect()
            }
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
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
