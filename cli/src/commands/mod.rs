//! One module (or function) per command.

pub mod run;
pub mod synth;

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::sync::Arc;

use phi4::memory::{self, PlanParams};
use phi4::tokenizer::Tokenizer;
use phi4::{LoadParams, Model};

use crate::describe::describe;
use crate::{InfoArgs, Res, TokenizeArgs};

/// Load a model, with a progress bar on a terminal.
pub fn load(path: &Path, repack: bool) -> Res<Arc<Model>> {
    let tty = std::io::stderr().is_terminal();
    let mut last = -1i32;
    let mut bar = |f: f32| {
        let pct = (f * 100.0) as i32;
        if tty && pct != last && f < 1.0 {
            last = pct;
            let n = (pct / 5) as usize;
            eprint!(
                "\rloading {} [{}{}] {pct:3}%",
                path.display(),
                "#".repeat(n),
                " ".repeat(20 - n)
            );
        }
        true
    };
    let model = Model::load(
        path,
        LoadParams {
            repack,
            prefetch: true,
            progress: Some(&mut bar),
        },
    );
    if tty && last >= 0 {
        eprint!("\r\x1b[2K");
    }
    Ok(Arc::new(model?))
}

pub fn info(a: InfoArgs) -> Res {
    println!("phi4 {}", env!("CARGO_PKG_VERSION"));
    println!("cpu kernels: {}", phi4::cpu_variant());
    let variants: Vec<String> = phi4::cpu_variants()
        .iter()
        .map(|(v, ok)| {
            if *ok {
                v.to_string()
            } else {
                format!("{v} (not on this cpu)")
            }
        })
        .collect();
    println!("cpu kernels built: {}", variants.join(", "));
    println!("cpu features: {}", phi4::cpu_features().join(" "));
    let Some(path) = a.model else { return Ok(()) };
    let params = LoadParams {
        repack: !a.no_repack,
        ..Default::default()
    };
    let m = Model::declare(&path, params)?;
    let d = PlanParams::default();
    let p = PlanParams {
        n_ctx: a.ctx_size.unwrap_or(d.n_ctx),
        kv_type: a.kv_type.unwrap_or(d.kv_type),
        sessions: a.parallel,
        n_batch: a.batch.unwrap_or(d.n_batch),
        n_threads: a.threads.unwrap_or(d.n_threads),
    };
    let plan = memory::plan(&m, &p)?;
    let mut lines = describe(&m, &path);
    lines.extend(crate::memory_lines(&m, &plan));
    let avail = match a.available {
        Some(bytes) => Some(memory::Available {
            bytes,
            source: "--available",
        }),
        None => memory::available()?,
    };
    if let Some(avail) = avail {
        lines.extend(crate::fit_lines(&m, &p, avail)?);
    }
    for (label, value) in lines {
        println!("{label}: {value}");
    }
    Ok(())
}

pub fn tokenize(a: TokenizeArgs) -> Res {
    let tok = Tokenizer::load(&a.model)?;
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| format!("stdin: {e}"))?;
    let ids: Vec<String> = tok
        .encode(&text, a.special)
        .iter()
        .map(|i| i.to_string())
        .collect();
    println!("{}", ids.join(" "));
    Ok(())
}
