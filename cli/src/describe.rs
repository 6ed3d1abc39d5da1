//! One description of a loaded model, for `phi4 info` and the REPL's `/show info`.

use phi4::limits::MAX_CONTEXT;
use phi4::{KvType, Model};

/// (label, value) lines: file, shape, KV cache cost, weight types, repacked layouts.
pub fn describe(m: &Model, path: &std::path::Path) -> Vec<(String, String)> {
    let c = &m.config;
    let mut lines = vec![
        (
            "model".to_string(),
            format!("{} ({:.2} GB)", path.display(), m.file_size as f64 / 1e9),
        ),
        (
            "shape".to_string(),
            format!(
                "{} layers x {}, heads {}/{} of {}, FFN {}, vocabulary {}, context {}",
                c.n_layer,
                c.n_embd,
                c.n_head,
                c.n_head_kv,
                c.head_dim,
                c.n_ff,
                c.n_vocab,
                c.n_ctx_train
            ),
        ),
    ];
    let n_max = c.n_ctx_train.min(MAX_CONTEXT);
    let per_type: Vec<String> = KvType::ALL
        .iter()
        .filter(|t| t.check(c).is_ok())
        .map(|t| {
            let b = t.bytes_per_token(c);
            format!(
                "{t} {b} ({:.2} GiB at {n_max})",
                (b * n_max as u64) as f64 / (1u64 << 30) as f64
            )
        })
        .collect();
    lines.push(("kv cache bytes per position".into(), per_type.join(", ")));
    let mut types: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for t in &m.gguf.tensors {
        let e = types.entry(t.ggml_type.name()).or_default();
        e.0 += 1;
        e.1 += t.size;
    }
    for (ty, (n, bytes)) in types {
        lines.push((
            format!("weights {ty}"),
            format!("{n} tensors, {:.1} MB", bytes as f64 / 1e6),
        ));
    }
    let repacked = match m.repacked_summary().as_str() {
        "none" => "none (all weights used in place from the file mapping)".to_string(),
        r => r.to_string(),
    };
    lines.push(("repacked".into(), repacked));
    lines
}
