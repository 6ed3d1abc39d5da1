//! Saved state on one model file: the time to evaluate a prompt, the size of its saved state,
//! the time to save it, and the time to restore it with the file in the page cache (warm) and
//! out of it (cold: the file's cached pages dropped first). The ratio of evaluating to restoring
//! is the time-to-first-token gain of a prompt kept on disk. First, the one-time cost of the
//! model's fingerprint (computed on the first save or load).
//!
//!     cargo bench --bench state -- --model FILE [--threads 2] [--prompt 2048] [--dir DIR] [--rounds 3]
//!
//! DIR (default: the system's temporary directory) should be on the disk being measured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use phi4::{Model, Session, SessionParams};

#[path = "common/options.rs"]
mod options;
use options::Options;

/// Drop the file's pages from the page cache (GNU dd: no data copied, the cache advised away).
fn drop_cache(path: &std::path::Path) {
    let st = std::process::Command::new("dd")
        .arg(format!("of={}", path.display()))
        .args([
            "oflag=nocache",
            "conv=notrunc,fdatasync",
            "count=0",
            "status=none",
        ])
        .status()
        .unwrap();
    assert!(
        st.success(),
        "dd could not drop the page cache of {}",
        path.display()
    );
}

fn main() {
    let o = Options::parse("cargo bench --bench state -- --model FILE [--threads N] [--prompt N] [--dir DIR] [--rounds N]");
    let (model, threads, prompt, dir): (PathBuf, usize, usize, PathBuf) = (
        o.path("model"),
        o.get("threads", 2),
        o.get("prompt", 2048),
        o.get("dir", std::env::temp_dir()),
    );
    let rounds = o.get("rounds", 3usize).max(1);
    let m = Arc::new(Model::load(&model, Default::default()).unwrap());
    // What the first save or load of a model costs once: its fingerprint, a CRC of every byte.
    let t = Instant::now();
    m.fingerprint();
    println!(
        "fingerprint of the model ({:.2} GB, every CPU): {:.0} ms",
        m.file_size as f64 / 1e9,
        t.elapsed().as_secs_f64() * 1e3
    );
    let params = SessionParams {
        n_ctx: prompt + 16,
        n_threads: threads,
        ..Default::default()
    };
    let tokens: Vec<u32> = (0..prompt)
        .map(|i| ((i * 7919 + 13) % (m.config.n_vocab - 8)) as u32)
        .collect();
    let mut s = Session::new(m.clone(), &params).unwrap();
    let t = Instant::now();
    s.warm(&tokens).unwrap();
    let eval = t.elapsed().as_secs_f64();
    let file = dir.join(format!("phi4-bench-state-{}.kv", std::process::id()));
    let t = Instant::now();
    let bytes = s.save(&file, usize::MAX).unwrap();
    let save = t.elapsed().as_secs_f64();
    drop(s);

    let mut r = Session::new(m.clone(), &params).unwrap();
    let (mut warm, mut cold) = (f64::MAX, f64::MAX);
    for _ in 0..rounds {
        for cached in [true, false] {
            if !cached {
                drop_cache(&file);
            }
            r.reset();
            let t = Instant::now();
            assert_eq!(r.load(&file).unwrap(), prompt);
            let took = t.elapsed().as_secs_f64();
            if cached {
                warm = warm.min(took);
            } else {
                cold = cold.min(took);
            }
        }
    }
    let _ = std::fs::remove_file(&file);
    println!(
        "model {}, {threads} threads, a {prompt}-token prompt",
        model.display()
    );
    println!(
        "  evaluate            {eval:8.2} s  ({:.1} tok/s)",
        prompt as f64 / eval
    );
    println!(
        "  saved state         {:8.1} MiB ({} bytes, {:.1} KiB per token), saved in {save:.2} s",
        bytes as f64 / 1048576.0,
        bytes,
        bytes as f64 / 1024.0 / prompt as f64
    );
    println!(
        "  restore, warm       {warm:8.3} s  ({:.0}x faster than evaluating)",
        eval / warm
    );
    println!(
        "  restore, cold       {cold:8.3} s  ({:.0}x faster than evaluating)",
        eval / cold
    );
}
