//! The memory plan on the command line: `phi4 info`'s lines, and the check `run` and `serve`
//! make before loading a model (refused, with the plan, when it would not fit; a flag runs it
//! anyway).

use std::path::Path;

use phi4::memory::{self, Available, Plan, PlanParams};
use phi4::{KvType, LoadParams, Model};

fn gib(b: u64) -> String {
    match b >= 1 << 30 {
        true => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        false => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
    }
}

/// What a run would hold, one line per holder.
pub fn lines(m: &Model, plan: &Plan) -> Vec<(String, String)> {
    let w = plan.weights;
    let per_token = plan.kv_type.bytes_per_token(&m.config);
    vec![
        (
            "memory plan".into(),
            format!(
                "{} for {} session(s) of {} positions, KV cache {}",
                gib(plan.total()),
                plan.sessions,
                plan.n_ctx,
                plan.kv_type
            ),
        ),
        (
            "  weights".into(),
            format!(
                "{} ({} in place in the file mapping, {} repacked)",
                gib(w.total()),
                gib(w.mapped),
                gib(w.repacked)
            ),
        ),
        (
            "  kv cache".into(),
            format!(
                "{} ({} bytes per position, {}: {} position(s) x {} session(s))",
                gib(plan.kv_cache),
                per_token,
                plan.kv_type,
                plan.n_ctx,
                plan.sessions
            ),
        ),
        ("  compute buffer".into(), gib(plan.compute)),
        ("  work buffer".into(), gib(plan.work)),
        (
            "  runtime".into(),
            format!("{} (tokenizer, code, threads)", gib(plan.runtime)),
        ),
    ]
}

/// "available" and the largest context per cache type that fits it.
pub fn fit_lines(
    m: &Model,
    p: &PlanParams,
    avail: Available,
) -> Result<Vec<(String, String)>, String> {
    let mut fits = Vec::new();
    for kv in KvType::ALL
        .into_iter()
        .filter(|kv| kv.check(&m.config).is_ok())
    {
        let q = PlanParams {
            kv_type: kv,
            ..p.clone()
        };
        let n = memory::largest_context(m, &q, avail.bytes)?;
        fits.push(match n {
            0 => format!("none ({kv})"),
            n => format!("{n} ({kv})"),
        });
    }
    Ok(vec![
        (
            "available".into(),
            format!("{} ({})", gib(avail.bytes), avail.source),
        ),
        (
            format!("largest context that fits ({} session(s))", p.sessions),
            fits.join(", "),
        ),
    ])
}

/// Before loading `path` for sessions of `p`: its plan, or why it may not run — the plan is
/// larger than the memory available now (unless `anyway`; then a warning).
pub fn check(path: &Path, repack: bool, p: &PlanParams, anyway: bool) -> Result<Plan, String> {
    let params = LoadParams {
        repack,
        ..Default::default()
    };
    let m = Model::declare(path, params).map_err(|e| e.to_string())?;
    let plan = memory::plan(&m, p)?;
    let Some(avail) = memory::available()? else {
        return Ok(plan);
    };
    if plan.total() <= avail.bytes {
        return Ok(plan);
    }
    let mut text = format!(
        "not enough memory: this would hold {}, and {} is available ({})",
        gib(plan.total()),
        gib(avail.bytes),
        avail.source
    );
    for (label, value) in lines(&m, &plan).into_iter().skip(1) {
        text.push_str(&format!("\n  {}: {value}", label.trim()));
    }
    let fits = fit_lines(&m, p, avail)?;
    for (label, value) in fits.iter().skip(1) {
        text.push_str(&format!("\n  {label}: {value}"));
    }
    let one = PlanParams {
        n_ctx: 1,
        kv_type: KvType::Q4_0,
        ..p.clone()
    };
    let hint = match memory::plan(&m, &one).map(|q| q.total() <= avail.bytes) {
        Ok(true) => "a smaller context (--ctx-size), a quantized KV cache (--kv-type) or fewer sessions fit",
        _ => "the weights do not leave room for any context: a smaller quantization of the model is needed",
    };
    match anyway {
        true => {
            eprintln!("phi4: warning: {text}\n  (going on: --skip-memory-check)");
            Ok(plan)
        }
        false => Err(format!(
            "{text}\n  {hint}; --skip-memory-check runs it anyway"
        )),
    }
}
