//! The `phi4` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use clap::{Parser, Subcommand};

use phi4::forward::RunState;
use phi4::model::{LoadParams, Model};
use phi4::synth;

#[derive(Parser)]
#[command(name = "phi4", version, about = "Run Phi-4 GGUF models on the CPU")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate from a model.
    Run(RunArgs),
    /// Write a synthetic Phi-4-shaped model with random weights.
    Synth(SynthArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// GGUF model file.
    #[arg(long)]
    model: PathBuf,
    /// Raw mode: no chat template; the prompt is given as token ids.
    #[arg(long)]
    raw: bool,
    /// Prompt token ids, comma-separated (with --raw).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Vec<u32>,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "num-predict", default_value_t = 128)]
    n_predict: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Threads for the forward pass.
    #[arg(long, default_value_t = default_threads())]
    threads: usize,
    /// Context size (positions in the KV cache), at most the model's.
    #[arg(long, default_value_t = 4096)]
    ctx_size: usize,
    /// Prompt micro-batch size.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Keep every weight in the file mapping (no repacking into faster layouts).
    #[arg(long)]
    no_repack: bool,
    /// Print NDJSON events instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Output file.
    #[arg(long, short)]
    out: PathBuf,
    /// Weight type: f32, f16, q8_0, q4_0, q4_k, q5_k, q6_k or q4_k_m.
    #[arg(long, default_value = "q4_k_m")]
    ftype: synth::Ftype,
    /// The full Phi-4 14B shape (40 x 5120, FFN 17920, 40/10 heads).
    #[arg(long)]
    full: bool,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 512)]
    embd: usize,
    #[arg(long, default_value_t = 1536)]
    ff: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 1)]
    kv_heads: usize,
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Size of a generated vocabulary (ignored with --vocab-from).
    #[arg(long, default_value_t = 1024)]
    vocab: usize,
    /// Copy the vocabulary from this GGUF file (e.g. a vocab-only Phi-4 file).
    #[arg(long)]
    vocab_from: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get())
}

fn main() -> ExitCode {
    // Errors are reported as one line; a bug (panic) too, never a backtrace or a signal.
    std::panic::set_hook(Box::new(|info| {
        let msg = info.payload().downcast_ref::<&str>().map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        eprintln!("phi4: internal error: {msg}");
    }));
    let cli = Cli::parse();
    let result = std::panic::catch_unwind(|| match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Synth(a) => synth_cmd(a),
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("phi4: {e}");
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::from(70),
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn synth_cmd(a: SynthArgs) -> Res {
    let vocab = match a.vocab_from {
        Some(p) => synth::Vocab::From(p),
        None => synth::Vocab::Tiny(a.vocab),
    };
    let mut spec = if a.full {
        synth::Spec::phi4(a.ftype, vocab)
    } else {
        synth::Spec {
            n_layer: a.layers,
            n_embd: a.embd,
            n_ff: a.ff,
            n_head: a.heads,
            n_head_kv: a.kv_heads,
            n_ctx: a.ctx,
            rope_theta: 250000.0,
            ftype: a.ftype,
            vocab,
            seed: a.seed,
        }
    };
    spec.seed = a.seed;
    let t = Instant::now();
    let size = synth::write(&spec, &a.out)?;
    eprintln!("wrote {} ({size} bytes) in {:.1}s", a.out.display(), t.elapsed().as_secs_f32());
    Ok(())
}

fn run(a: RunArgs) -> Res {
    if !a.raw {
        return Err("only --raw mode is available in this build".into());
    }
    if a.prompt_ids.is_empty() {
        return Err("--raw needs --prompt-ids".into());
    }
    if a.threads == 0 || a.batch == 0 || a.ctx_size == 0 {
        return Err("--threads, --batch and --ctx-size must be at least 1".into());
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        return Err("--temperature must be a finite number >= 0".into());
    }
    let t0 = Instant::now();
    let params = LoadParams { repack: !a.no_repack, ..Default::default() };
    let model = Model::load(&a.model, params)?;
    let load_ns = t0.elapsed().as_nanos();
    let n_ctx = a.ctx_size.min(model.config.n_ctx_train);
    if a.prompt_ids.len() >= n_ctx {
        return Err(format!("prompt of {} tokens does not fit the context of {n_ctx}", a.prompt_ids.len()).into());
    }
    let mut st = RunState::new(&model, n_ctx, a.batch, a.threads)?;
    let abort = AtomicBool::new(false);
    let eog = model.end_of_generation.clone();
    let mut sampler = phi4::sample::Sampler::new(phi4::sample::SamplingParams { temperature: a.temperature, seed: a.seed, ..phi4::sample::SamplingParams::greedy() });

    let t1 = Instant::now();
    st.eval(&model, &a.prompt_ids, 0, &abort)?;
    let prompt_ns = t1.elapsed().as_nanos();

    let out = std::io::stdout();
    let mut out = out.lock();
    let t2 = Instant::now();
    let mut n_past = a.prompt_ids.len();
    let mut eval_count = 0;
    let mut reason = "length";
    for i in 0..a.n_predict {
        let tok = sampler.sample(&st.logits, &[]);
        if eog.contains(&tok) {
            reason = "stop";
            break;
        }
        eval_count += 1;
        if a.json {
            writeln!(out, "{{\"token\": {tok}}}")?;
        } else {
            write!(out, "{tok} ")?;
        }
        out.flush()?;
        if i + 1 == a.n_predict {
            break;
        }
        if n_past + 1 > n_ctx {
            reason = "length";
            break;
        }
        st.eval(&model, &[tok], n_past, &abort)?;
        n_past += 1;
    }
    let eval_ns = t2.elapsed().as_nanos();
    if a.json {
        writeln!(
            out,
            "{{\"done\": true, \"done_reason\": \"{reason}\", \"load_duration\": {load_ns}, \"prompt_eval_count\": {}, \"prompt_eval_duration\": {prompt_ns}, \"eval_count\": {eval_count}, \"eval_duration\": {eval_ns}}}",
            a.prompt_ids.len()
        )?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}
