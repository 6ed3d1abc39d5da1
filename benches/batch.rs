//! Concurrent streams: aggregate decode tok/s and each stream's tok/s for 1, 2, 4 … streams
//! decoding at once, in one run, side by side:
//!
//! - `phi4`: sessions on one scheduler (a step advances every stream);
//! - `phi4-alone`: sessions each with an engine of its own, threads split between them (what
//!   the streams cost without batching);
//! - `llama.cpp`: one context with a sequence per stream, one `llama_decode` per step over all
//!   of them (llama-server's parallel slots).
//!
//!     cargo bench --bench batch -- --model FILE [--threads 2] [--streams 1,2,4] [--prompt 16] [--gen 24] [--rounds 2] [--repack false]
//!
//! Each engine runs in its own child process; engines alternate for `--rounds` rounds and each
//! figure is the best round. Figures are taken over the window where every stream is decoding
//! (after the last stream's first token, before the first stream's end).

#[path = "common/options.rs"]
mod options;
#[path = "../tests/common/reference.rs"]
mod reference;

use std::process::Command;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use options::Options;
use phi4::sample::{argmax, SamplingParams};
use phi4::{GenerateParams, Model, Scheduler, Session, SessionParams};

const USAGE: &str = "cargo bench --bench batch -- --model FILE [--threads 2] [--streams 1,2,4] [--prompt 16] [--gen 24] [--rounds 2]";
const ENGINES: [&str; 3] = ["phi4", "phi4-alone", "llama.cpp"];

fn prompt(stream: usize, n: usize, n_vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + stream * 104_729 + 13) % n_vocab.min(100_000)) as u32)
        .collect()
}

/// Aggregate tok/s and mean per-stream tok/s from each stream's token times.
fn figures(times: &[Vec<Instant>]) -> (f64, f64) {
    let start = times.iter().map(|t| t[0]).max().unwrap();
    let end = times.iter().map(|t| *t.last().unwrap()).min().unwrap();
    let window = (end - start).as_secs_f64();
    let inside = |t: &Vec<Instant>| t.iter().filter(|&&x| x > start && x <= end).count();
    let total: usize = times.iter().map(inside).sum();
    let per_stream =
        times.iter().map(|t| inside(t) as f64 / window).sum::<f64>() / times.len() as f64;
    (total as f64 / window, per_stream)
}

/// phi4: every stream on its own thread, on one scheduler or each on an engine of its own.
fn phi4_streams(
    model: &Arc<Model>,
    scheduler: Option<&Scheduler>,
    n: usize,
    threads: usize,
    p: usize,
    gen: usize,
) -> (f64, f64) {
    let sp = SessionParams {
        n_ctx: p + gen + 8,
        n_batch: p,
        n_threads: (threads / n).max(1),
        ..Default::default()
    };
    // Plain decoding (no drafts): the streams' steps, side by side with llama.cpp's.
    let gp = GenerateParams {
        sampling: SamplingParams::greedy(),
        max_tokens: gen,
        draft: 0,
        ..Default::default()
    };
    let start = Barrier::new(n);
    let times = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for k in 0..n {
            let (start, times, sp, gp) = (&start, &times, sp.clone(), gp.clone());
            sc.spawn(move || {
                let mut s = match scheduler {
                    Some(sched) => Session::with_scheduler(sched, &sp).unwrap(),
                    None => Session::new(model.clone(), &sp).unwrap(),
                };
                let prompt = prompt(k, p, model.config.n_vocab);
                s.warm(&prompt[..p - 1]).unwrap();
                start.wait();
                let mut t = Vec::with_capacity(gen);
                s.generate(&prompt, &gp, &mut |id, _| {
                    if id.is_some() {
                        t.push(Instant::now());
                    }
                    true
                })
                .unwrap();
                times.lock().unwrap().push(t);
            });
        }
    });
    figures(&times.into_inner().unwrap())
}

fn llama_streams(rf: &mut reference::Reference, n: usize, p: usize, gen: usize) -> (f64, f64) {
    rf.clear();
    let mut next: Vec<u32> = (0..n)
        .map(|k| argmax(&rf.eval_seq(k as i32, &prompt(k, p, rf.n_vocab), 0)))
        .collect();
    let mut times = vec![Vec::with_capacity(gen); n];
    times.iter_mut().for_each(|t| t.push(Instant::now()));
    for step in 0..gen - 1 {
        let items: Vec<_> = (0..n).map(|k| (k as i32, next[k], p + step)).collect();
        let logits = rf.decode_seqs(&items);
        let now = Instant::now();
        for k in 0..n {
            next[k] = argmax(&logits[k]);
            times[k].push(now);
        }
    }
    figures(&times)
}

/// One engine over every stream count; prints "n aggregate per_stream" lines.
fn child(o: &Options, engine: &str, streams: &[usize]) {
    let (path, threads, p, gen) = (
        o.path("model"),
        o.get("threads", 2usize),
        o.get("prompt", 16usize),
        o.get("gen", 24usize),
    );
    let max = *streams.iter().max().unwrap();
    match engine {
        "llama.cpp" => {
            let mut rf = reference::Reference::load_seqs(
                &path,
                p + gen + 8,
                p,
                threads,
                max,
                o.get("repack", true),
                "f16",
            );
            for &n in streams {
                let (agg, per) = llama_streams(&mut rf, n, p, gen);
                println!("{n} {agg} {per}");
            }
        }
        _ => {
            let lp = phi4::LoadParams {
                repack: o.get("repack", true),
                ..Default::default()
            };
            let model = Arc::new(Model::load(&path, lp).unwrap());
            let scheduler =
                (engine == "phi4").then(|| Scheduler::new(model.clone(), threads, max).unwrap());
            for &n in streams {
                let (agg, per) = phi4_streams(&model, scheduler.as_ref(), n, threads, p, gen);
                println!("{n} {agg} {per}");
            }
        }
    }
}

fn main() {
    let o = Options::parse(USAGE);
    let streams: Vec<usize> = o
        .get("streams", "1,2,4".to_string())
        .split(',')
        .map(|s| s.trim().parse().expect("--streams N,N,…"))
        .collect();
    if let Some(engine) = o
        .get::<String>("engine", String::new())
        .split_whitespace()
        .next()
    {
        return child(&o, engine, &streams);
    }
    let me = std::env::current_exe().unwrap();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = |engine: &str| -> Vec<(f64, f64)> {
        let out = Command::new(&me)
            .args(&args)
            .args(["--engine", engine])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{engine} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let v: Vec<f64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
                (v[1], v[2])
            })
            .collect()
    };
    let rounds = o.get("rounds", 2usize).max(1);
    let mut best: Vec<Vec<(f64, f64)>> = vec![vec![(0.0, 0.0); streams.len()]; ENGINES.len()];
    for r in 0..rounds {
        // Alternate the order, so that no engine always runs first.
        let order: Vec<usize> = if r % 2 == 0 {
            (0..ENGINES.len()).collect()
        } else {
            (0..ENGINES.len()).rev().collect()
        };
        for e in order {
            for (b, v) in best[e].iter_mut().zip(run(ENGINES[e])) {
                *b = (b.0.max(v.0), b.1.max(v.1));
            }
        }
    }
    let size = std::fs::metadata(o.path("model"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "model {} ({:.2} GB), {} threads, best of {rounds} rounds",
        o.path("model").display(),
        size as f64 / 1e9,
        o.get("threads", 2usize)
    );
    println!(
        "{:<8} {:>22} {:>22} {:>22} {:>9} {:>9}",
        "streams",
        "phi4 agg / stream",
        "phi4-alone agg / stream",
        "llama.cpp agg / stream",
        "vs alone",
        "vs llama"
    );
    let one = best[0][0].0;
    for (i, n) in streams.iter().enumerate() {
        let cell = |e: usize| format!("{:>9.3} / {:>8.3}", best[e][i].0, best[e][i].1);
        println!(
            "{:<8} {:>22} {:>22} {:>22} {:>9.3} {:>9.3}",
            n,
            cell(0),
            cell(1),
            cell(2),
            best[0][i].0 / best[1][i].0,
            best[0][i].0 / best[2][i].0
        );
    }
    println!(
        "phi4 aggregate decode vs one stream: {}",
        streams
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{n}: {:.2}x", best[0][i].0 / one))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
