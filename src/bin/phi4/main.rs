//! The `phi4` command line: `run` (one-shot, REPL, or raw token ids), `tokenize`, `synth`.

mod repl;

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};

use phi4::chat::{Message, Role};
use phi4::model::{LoadParams, Model};
use phi4::sample::SamplingParams;
use phi4::session::{GenerateParams, Outcome, Overflow, Session, SessionParams};
use phi4::synth;

#[derive(Parser)]
#[command(name = "phi4", version, about = "Run Phi-4 GGUF models on the CPU")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Chat with a model: one-shot with a PROMPT (or piped stdin), otherwise an interactive REPL.
    Run(RunArgs),
    /// Read text on stdin and print its token ids on one line.
    Tokenize(TokenizeArgs),
    /// Write a synthetic Phi-4-shaped model with random weights.
    Synth(SynthArgs),
    /// Show the CPU features ggml uses here and, with --model, what loading that model does:
    /// its shape, weight types, and which weights were repacked into faster layouts.
    Info(InfoArgs),
}

#[derive(clap::Args)]
struct InfoArgs {
    #[arg(long)]
    model: Option<PathBuf>,
    /// Keep every weight in the file mapping (show what loading without repacking does).
    #[arg(long)]
    no_repack: bool,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// GGUF model file.
    #[arg(long)]
    model: PathBuf,
    /// The message to answer (one-shot). Without it, stdin is read when it is not a terminal.
    prompt: Option<String>,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    /// Raw mode: no chat template; the prompt is given as token ids (--prompt-ids).
    #[arg(long)]
    raw: bool,
    /// Prompt token ids, comma-separated (with --raw).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Vec<u32>,
    /// Tokens to generate at most (0: until the context is full).
    #[arg(short = 'n', long = "num-predict", default_value_t = 0)]
    n_predict: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Threads for the forward pass.
    #[arg(long, default_value_t = default_threads())]
    threads: usize,
    /// Context size (positions in the KV cache), at most the model's.
    #[arg(long, default_value_t = 4096)]
    ctx_size: usize,
    /// Prompt micro-batch size.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// When the conversation outgrows the context, drop the oldest turns instead of failing.
    #[arg(long)]
    drop_oldest: bool,
    /// Keep every weight in the file mapping (no repacking into faster layouts).
    #[arg(long)]
    no_repack: bool,
    /// Print NDJSON events instead of text.
    #[arg(long)]
    json: bool,
    /// Print timings after each reply.
    #[arg(long)]
    verbose: bool,
}

#[derive(clap::Args)]
struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.1)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
struct TokenizeArgs {
    #[arg(long)]
    model: PathBuf,
    /// Recognise special tokens (`<|im_start|>`, ...) written in the text.
    #[arg(long)]
    special: bool,
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
    SessionParams::default().n_threads
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
        Cmd::Tokenize(a) => tokenize(a),
        Cmd::Synth(a) => synth_cmd(a),
        Cmd::Info(a) => info(a),
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

pub type Res = Result<(), Box<dyn std::error::Error>>;

fn synth_cmd(a: SynthArgs) -> Res {
    let vocab = match a.vocab_from {
        Some(p) => synth::Vocab::From(p),
        None => synth::Vocab::Tiny(a.vocab),
    };
    let spec = if a.full {
        synth::Spec { seed: a.seed, ..synth::Spec::phi4(a.ftype, vocab) }
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
    let t = Instant::now();
    let size = synth::write(&spec, &a.out)?;
    eprintln!("wrote {} ({size} bytes) in {:.1}s", a.out.display(), t.elapsed().as_secs_f32());
    Ok(())
}

/// Load a model, with a progress bar on a terminal.
fn load(path: &std::path::Path, repack: bool) -> Result<Arc<Model>, Box<dyn std::error::Error>> {
    let tty = std::io::stderr().is_terminal();
    let mut last = -1i32;
    let mut bar = |f: f32| {
        let pct = (f * 100.0) as i32;
        if tty && pct != last && f < 1.0 {
            last = pct;
            let n = (pct / 5) as usize;
            eprint!("\rloading {} [{}{}] {pct:3}%", path.display(), "#".repeat(n), " ".repeat(20 - n));
        }
        true
    };
    let params = LoadParams { repack, prefetch: true, progress: Some(&mut bar) };
    let model = Model::load(path, params);
    if tty && last >= 0 {
        eprint!("\r\x1b[2K");
    }
    Ok(Arc::new(model?))
}

fn info(a: InfoArgs) -> Res {
    println!("phi4 {}", env!("CARGO_PKG_VERSION"));
    println!("cpu features: {}", phi4::ggml::cpu_features().join(" "));
    let Some(path) = a.model else { return Ok(()) };
    let m = load(&path, !a.no_repack)?;
    let c = &m.config;
    println!("model: {} ({:.2} GB)", path.display(), m.file_size as f64 / 1e9);
    println!("shape: {} layers x {}, heads {}/{} of {}, FFN {}, vocabulary {}, context {}", c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.n_vocab, c.n_ctx_train);
    let kv = phi4::kv_cache::KvCache::bytes_for(c, 1);
    println!("kv cache: {kv} bytes per token ({:.2} GiB at {})", (kv * c.n_ctx_train.min(16384) as u64) as f64 / (1u64 << 30) as f64, c.n_ctx_train.min(16384));
    let mut types: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    for t in &m.gguf.tensors {
        let e = types.entry(t.ggml_type.name().to_string()).or_default();
        e.0 += 1;
        e.1 += t.size;
    }
    for (ty, (n, bytes)) in &types {
        println!("weights {ty}: {n} tensors, {:.1} MB", *bytes as f64 / 1e6);
    }
    match m.repacked_summary().as_str() {
        "none" => println!("repacked: none (all weights used in place from the file mapping)"),
        r => println!("repacked: {r}"),
    }
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> Res {
    // Only the header is read (through the mapping), not the weights.
    let io = |e: std::io::Error| format!("{}: {e}", a.model.display());
    let map = phi4::ggml::map_file(&std::fs::File::open(&a.model).map_err(io)?).map_err(io)?;
    let g = phi4::gguf::parse(&map)?;
    let n_vocab = match g.get("tokenizer.ggml.tokens") {
        Some(phi4::gguf::Value::Array(_, t)) => t.len(),
        _ => return Err("the file has no tokenizer.ggml.tokens".into()),
    };
    let tok = phi4::tokenizer::Tokenizer::from_gguf(&g, n_vocab)?;
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text).map_err(|e| format!("stdin: {e}"))?;
    let ids: Vec<String> = tok.encode(&text, a.special).iter().map(|i| i.to_string()).collect();
    println!("{}", ids.join(" "));
    Ok(())
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
        }
    }
}

fn run(a: RunArgs) -> Res {
    if a.threads == 0 || a.batch == 0 || a.ctx_size == 0 {
        return Err("--threads, --batch and --ctx-size must be at least 1".into());
    }
    let mut gp = GenerateParams { sampling: a.sampling.params(), max_tokens: a.n_predict, stop: a.stop.clone() };
    if a.raw {
        if a.prompt_ids.is_empty() {
            return Err("--raw needs --prompt-ids".into());
        }
        // Raw mode is for comparing engines: plain greedy/temperature sampling, no penalties.
        gp.sampling = SamplingParams { temperature: a.sampling.temperature, seed: a.sampling.seed, ..SamplingParams::greedy() };
    }
    gp.sampling.validate()?;
    let model = load(&a.model, !a.no_repack)?;
    let sp = SessionParams {
        n_ctx: a.ctx_size.min(model.config.n_ctx_train).min(16384),
        n_batch: a.batch,
        n_threads: a.threads,
        overflow: if a.drop_oldest { Overflow::DropOldest } else { Overflow::Error },
    };
    let mut session = Session::new(model.clone(), &sp)?;

    if a.raw {
        return raw(&mut session, &a.prompt_ids, &gp, a.json);
    }
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message::new(Role::System, s.clone()));
    }
    let stdin = std::io::stdin();
    let prompt = match &a.prompt {
        Some(p) => Some(p.clone()),
        None if !stdin.is_terminal() => {
            let mut s = String::new();
            stdin.lock().read_to_string(&mut s).map_err(|e| format!("stdin: {e}"))?;
            Some(s)
        }
        None => None,
    };
    match prompt {
        Some(p) => {
            messages.push(Message::new(Role::User, p));
            let out = reply(&mut session, &messages, &gp, a.json)?;
            if a.verbose && !a.json {
                print_timings(&out);
            }
            Ok(())
        }
        None => repl::run(&mut session, messages, gp, &a),
    }
}

/// Generate one reply, streaming text (or NDJSON) to stdout.
pub fn reply(session: &mut Session, messages: &[Message], gp: &GenerateParams, json: bool) -> Result<Outcome, Box<dyn std::error::Error>> {
    let out = std::io::stdout();
    let mut on_piece = |_id: Option<u32>, piece: &str| {
        if piece.is_empty() {
            return true;
        }
        let mut o = out.lock();
        let ok = if json {
            writeln!(o, "{}", serde_json_line(&[("piece", Json::Str(piece))]))
        } else {
            write!(o, "{piece}")
        };
        ok.and_then(|_| o.flush()).is_ok()
    };
    let outcome = session.chat(messages, gp, &mut on_piece)?;
    finish_line(&outcome, json)?;
    Ok(outcome)
}

fn finish_line(o: &Outcome, json: bool) -> Res {
    let mut out = std::io::stdout().lock();
    if json {
        let t = &o.timings;
        let mut fields = vec![
            ("done", Json::Bool(true)),
            ("done_reason", Json::Str(o.reason.as_str())),
            ("load_duration", Json::Num(t.load_duration)),
            ("prompt_eval_count", Json::Num(t.prompt_eval_count as u64)),
            ("prompt_eval_duration", Json::Num(t.prompt_eval_duration)),
            ("eval_count", Json::Num(t.eval_count as u64)),
            ("eval_duration", Json::Num(t.eval_duration)),
        ];
        if o.dropped_messages > 0 {
            fields.push(("dropped_messages", Json::Num(o.dropped_messages as u64)));
        }
        writeln!(out, "{}", serde_json_line(&fields))?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}

fn raw(session: &mut Session, prompt: &[u32], gp: &GenerateParams, json: bool) -> Res {
    let out = std::io::stdout();
    let mut on_token = |id: Option<u32>, _: &str| {
        let Some(id) = id else { return true };
        let mut o = out.lock();
        let ok = if json {
            writeln!(o, "{}", serde_json_line(&[("token", Json::Num(u64::from(id)))]))
        } else {
            write!(o, "{id} ")
        };
        ok.and_then(|_| o.flush()).is_ok()
    };
    let outcome = session.generate(prompt, gp, &mut on_token)?;
    finish_line(&outcome, json)
}

fn print_timings(o: &Outcome) {
    let t = &o.timings;
    let rate = |n: usize, ns: u64| if ns > 0 { n as f64 / (ns as f64 / 1e9) } else { 0.0 };
    eprintln!("load duration:        {:.3}s", t.load_duration as f64 / 1e9);
    eprintln!("prompt eval count:    {} token(s)", t.prompt_eval_count);
    eprintln!("prompt eval duration: {:.3}s", t.prompt_eval_duration as f64 / 1e9);
    eprintln!("prompt eval rate:     {:.2} tokens/s", rate(t.prompt_eval_count, t.prompt_eval_duration));
    eprintln!("eval count:           {} token(s)", t.eval_count);
    eprintln!("eval duration:        {:.3}s", t.eval_duration as f64 / 1e9);
    eprintln!("eval rate:            {:.2} tokens/s", rate(t.eval_count, t.eval_duration));
}

/// A JSON value for the CLI's one-line events.
pub enum Json<'a> {
    Str(&'a str),
    Num(u64),
    Bool(bool),
}

/// One JSON object on one line.
pub fn serde_json_line(fields: &[(&str, Json<'_>)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&format!("\"{k}\": "));
        match v {
            Json::Str(t) => json_string(&mut s, t),
            Json::Num(n) => s.push_str(&n.to_string()),
            Json::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        }
    }
    s.push('}');
    s
}

fn json_string(out: &mut String, t: &str) {
    out.push('"');
    for c in t.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}
