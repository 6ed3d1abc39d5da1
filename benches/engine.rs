//! Engine benchmark: prefill tok/s, decode tok/s and peak RSS for phi4 and for llama.cpp on the
//! same GGUF file, in one run, side by side.
//!
//!     cargo bench --bench engine -- --model FILE [--threads 2] [--prompt 64] [--gen 16]
//!         [--variants avx2,avx512_bf16] [--busy-core 1] [--rounds 2]
//!
//! `phi4` runs the CPU kernels it chooses; `--variants` adds a phi4 column per kernel variant
//! named (PHI4_CPU_VARIANT), e.g. the baseline against the one chosen; `ggml` (or
//! `ggml:<variant>`) is phi4 on ggml's kernels only (PHI4_KERNELS=ggml): with the AVX-512
//! variant, ggml's AVX-512 kernels, as a llama.cpp built for AVX-512 runs them. `--busy-core N` keeps a
//! busy loop pinned to core N during every run (`taskset`): a board whose other cores run the
//! user's firmware.
//!
//! Each engine runs in its own child process (this binary again), one after the other, so that
//! each peak RSS is that engine's alone. The engines alternate for `--rounds` rounds (default 2)
//! and each figure is the engine's best round, so neither gains from running second (a warm page
//! cache, memory just freed by the other).

#[path = "../tests/common/reference.rs"]
mod reference;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

struct Args {
    model: PathBuf,
    threads: usize,
    prompt: usize,
    gen: usize,
    batch: usize,
    rounds: usize,
    engine: Option<String>,
    variants: Vec<String>,
    busy_core: Option<usize>,
}

fn parse_args() -> Args {
    let mut a = Args {
        model: PathBuf::new(),
        threads: 2,
        prompt: 64,
        gen: 16,
        batch: 512,
        rounds: 2,
        engine: None,
        variants: Vec::new(),
        busy_core: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--model" => a.model = v().into(),
            "--threads" => a.threads = v().parse().unwrap(),
            "--prompt" => a.prompt = v().parse().unwrap(),
            "--gen" => a.gen = v().parse().unwrap(),
            "--batch" => a.batch = v().parse().unwrap(),
            "--engine" => a.engine = Some(v()),
            "--rounds" => a.rounds = v().parse::<usize>().unwrap().max(1),
            "--variants" => a.variants = v().split(',').map(str::to_string).collect(),
            "--busy-core" => a.busy_core = Some(v().parse().unwrap()),
            _ => {} // cargo bench's own flags (--bench)
        }
    }
    if a.model.as_os_str().is_empty() {
        eprintln!("usage: cargo bench --bench engine -- --model FILE [--threads N] [--prompt N] [--gen N] [--batch N]");
        std::process::exit(2);
    }
    a
}

fn peak_rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn prompt_tokens(n: usize, n_vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + 13) % n_vocab.min(100_000)) as u32)
        .collect()
}

/// Runs one engine; prints "load_s prefill_tok_s decode_tok_s peak_rss_mib".
fn child(a: &Args, engine: &str) {
    let t0 = Instant::now();
    let (prefill, decode);
    match engine {
        "phi4" => {
            let model =
                std::sync::Arc::new(phi4::Model::load(&a.model, Default::default()).unwrap());
            let load = t0.elapsed().as_secs_f64();
            let sp = phi4::SessionParams {
                n_ctx: a.prompt + a.gen + 1,
                n_batch: a.batch,
                n_threads: a.threads,
                ..Default::default()
            };
            let mut st = phi4::Session::new(model.clone(), &sp).unwrap();
            let prompt = prompt_tokens(a.prompt, model.config.n_vocab);
            let t = Instant::now();
            let mut tok = phi4::sample::argmax(st.evaluate(&prompt).unwrap());
            prefill = a.prompt as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            for _ in 0..a.gen {
                tok = phi4::sample::argmax(st.evaluate(&[tok]).unwrap());
            }
            decode = a.gen as f64 / t.elapsed().as_secs_f64();
            println!("{load} {prefill} {decode} {}", peak_rss_mib());
        }
        _ => {
            let mut rf =
                reference::Reference::load(&a.model, a.prompt + a.gen + 1, a.batch, a.threads);
            let load = t0.elapsed().as_secs_f64();
            let prompt = prompt_tokens(a.prompt, rf.n_vocab);
            let t = Instant::now();
            let logits = rf.eval(&prompt);
            prefill = a.prompt as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            let mut tok = phi4::sample::argmax(&logits);
            for _ in 0..a.gen {
                tok = phi4::sample::argmax(&rf.eval(&[tok]));
            }
            decode = a.gen as f64 / t.elapsed().as_secs_f64();
            println!("{load} {prefill} {decode} {}", peak_rss_mib());
        }
    }
}

fn main() {
    let a = parse_args();
    if let Some(e) = &a.engine {
        return child(&a, e);
    }
    let me = std::env::current_exe().unwrap();
    // Columns: phi4 (its own choice of kernels), phi4 per variant asked for, llama.cpp.
    let mut engines: Vec<(String, &str, Option<&str>)> = vec![("phi4".into(), "phi4", None)];
    engines.extend(
        a.variants
            .iter()
            .map(|v| (format!("phi4 {v}"), "phi4", Some(v.as_str()))),
    );
    engines.push(("llama.cpp".into(), "llama.cpp", None));
    let run = |engine: &str, variant: Option<&str>| -> Vec<f64> {
        let mut c = Command::new(&me);
        c.args(["--model", a.model.to_str().unwrap(), "--engine", engine])
            .args([
                "--threads",
                &a.threads.to_string(),
                "--prompt",
                &a.prompt.to_string(),
            ])
            .args(["--gen", &a.gen.to_string(), "--batch", &a.batch.to_string()]);
        match variant.map(|v| v.split_once(':').unwrap_or((v, ""))) {
            // "ggml" or "ggml:<variant>": phi4 on ggml's kernels only (PHI4_KERNELS=ggml).
            Some(("ggml", v)) => {
                c.env("PHI4_KERNELS", "ggml");
                if !v.is_empty() {
                    c.env("PHI4_CPU_VARIANT", v);
                }
            }
            Some((v, _)) => {
                c.env("PHI4_CPU_VARIANT", v);
            }
            None => {}
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{engine} run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    let size = std::fs::metadata(&a.model).map(|m| m.len()).unwrap_or(0);
    println!(
        "model {} ({:.2} GB), {} threads, prompt {} tokens (batch {}), {} decoded tokens",
        a.model.display(),
        size as f64 / 1e9,
        a.threads,
        a.prompt,
        a.batch,
        a.gen
    );
    println!(
        "phi4 CPU kernels: {} ({}); llama.cpp: the build's baseline",
        phi4::cpu_variant(),
        phi4::cpu_features().join(" ")
    );
    let busy = a.busy_core.map(|core| {
        println!("a busy loop runs on core {core} throughout");
        Command::new("taskset")
            .args(["-c", &core.to_string(), "sh", "-c", "while :; do :; done"])
            .spawn()
            .expect("taskset (util-linux)")
    });
    let best = |a: Vec<f64>, b: Vec<f64>| -> Vec<f64> {
        // load: lower is better; prefill, decode: higher; peak RSS: the same every round.
        vec![
            a[0].min(b[0]),
            a[1].max(b[1]),
            a[2].max(b[2]),
            a[3].min(b[3]),
        ]
    };
    let mut figures: Vec<Option<Vec<f64>>> = vec![None; engines.len()];
    for r in 0..a.rounds {
        // Alternate the order, so that no engine always runs first.
        let order: Vec<usize> = if r % 2 == 0 {
            (0..engines.len()).collect()
        } else {
            (0..engines.len()).rev().collect()
        };
        for e in order {
            let got = run(engines[e].1, engines[e].2);
            figures[e] = Some(match figures[e].take() {
                None => got,
                Some(prev) => best(prev, got),
            });
        }
    }
    if let Some(mut b) = busy {
        let _ = b.kill();
        let _ = b.wait();
    }
    let figures: Vec<Vec<f64>> = figures.into_iter().map(Option::unwrap).collect();
    let llama = figures.last().unwrap();
    print!("{:<16}", "");
    engines
        .iter()
        .for_each(|(name, _, _)| print!(" {name:>14}"));
    engines[..engines.len() - 1]
        .iter()
        .for_each(|(name, _, _)| print!(" {:>14}", format!("{name}/llama")));
    println!();
    let names = ["load (s)", "prefill tok/s", "decode tok/s", "peak RSS MiB"];
    for i in 0..4 {
        print!("{:<16}", names[i]);
        figures.iter().for_each(|f| print!(" {:>14.3}", f[i]));
        figures[..figures.len() - 1]
            .iter()
            .for_each(|f| print!(" {:>14.3}", f[i] / llama[i]));
        println!();
    }
}
