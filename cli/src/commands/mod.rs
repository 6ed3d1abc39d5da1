//! One module (or function) per command.

pub mod run;
pub mod synth;

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::sync::Arc;

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
    let m = load(&path, !a.no_repack)?;
    for (label, value) in describe(&m, &path) {
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
