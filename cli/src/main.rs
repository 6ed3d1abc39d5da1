//! The `phi4` command line: arguments and dispatch. Each command is a module of `commands/`;
//! what they print goes through `output.rs`; the interactive loop of `phi4 run` is `repl.rs`;
//! `phi4 serve` is the crate's library (`lib.rs`, `serve/`).

mod commands;
mod describe;
mod options;
mod output;
mod repl;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use phi4_cli::memory::{fit_lines, lines as memory_lines};
use phi4_cli::{serve, Res};

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
    /// Serve the model over Ollama's HTTP API (and OpenAI's), as `ollama serve` does.
    Serve(serve::ServeArgs),
    /// Read text on stdin and print its token ids on one line.
    Tokenize(TokenizeArgs),
    /// Write a synthetic Phi-4-shaped model with random weights.
    Synth(commands::synth::SynthArgs),
    /// Show the CPU features ggml uses here and, with --model, what loading that model would do
    /// (nothing is loaded): its shape, weight types, which weights are repacked into faster
    /// layouts, the memory a run would hold and the largest context that fits now.
    Info(InfoArgs),
}

#[derive(clap::Args)]
pub struct InfoArgs {
    #[arg(long)]
    model: Option<PathBuf>,
    /// Keep every weight in the file mapping (show what loading without repacking does).
    #[arg(long)]
    no_repack: bool,
    /// The memory plan's context [default: the default context].
    #[arg(long)]
    ctx_size: Option<usize>,
    /// The memory plan's KV cache type: f16, q8_0, q4_0 [default: f16].
    #[arg(long, value_name = "TYPE", value_parser = phi4::KvType::from_name)]
    kv_type: Option<phi4::KvType>,
    /// The memory plan's sessions (`phi4 serve --parallel`).
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// The memory plan's threads [default: the number of CPUs].
    #[arg(long)]
    threads: Option<usize>,
    /// The memory plan's prompt micro-batch size.
    #[arg(long)]
    batch: Option<usize>,
    /// Fit the plan to this much memory (e.g. 7.5G, what an 8 GB board has free) instead of
    /// what is available here.
    #[arg(long, value_name = "SIZE", value_parser = phi4::memory::parse_size)]
    available: Option<u64>,
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
    /// Generation options (Ollama's names): --temperature, --top-k, ..., -n/--num-predict, --stop.
    #[command(flatten)]
    options: options::GenerateArgs,
    #[command(flatten)]
    format: options::FormatArgs,
    /// Threads for the forward pass [default: the number of CPUs].
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, help = format!(
        "Context size (positions in the KV cache), at most the model's and {} [default: {}]",
        phi4::limits::MAX_CONTEXT, phi4::limits::DEFAULT_CONTEXT
    ))]
    ctx_size: Option<usize>,
    #[arg(long, help = format!("Prompt micro-batch size [default: {}]", phi4::limits::DEFAULT_BATCH))]
    batch: Option<usize>,
    /// What the KV cache keeps K and V in: f16, q8_0 (about half the memory) or q4_0 (about a
    /// quarter) [default: f16].
    #[arg(long, value_name = "TYPE", value_parser = phi4::KvType::from_name)]
    kv_type: Option<phi4::KvType>,
    /// When the conversation outgrows the context, drop the oldest turns instead of failing.
    #[arg(long)]
    drop_oldest: bool,
    /// Keep every weight in the file mapping (no repacking into faster layouts).
    #[arg(long)]
    no_repack: bool,
    /// Run even when the memory plan is larger than the memory available (see `phi4 info`).
    #[arg(long)]
    skip_memory_check: bool,
    /// Keep the evaluated prompt in FILE: restore what of it matches this prompt on start, save
    /// it once the prompt is evaluated (a long system prompt is then evaluated once, ever).
    #[arg(long, value_name = "FILE")]
    prompt_cache: Option<PathBuf>,
    /// Print NDJSON events instead of text.
    #[arg(long)]
    json: bool,
    /// Print timings after each reply.
    #[arg(long)]
    verbose: bool,
}

#[derive(clap::Args)]
pub struct TokenizeArgs {
    #[arg(long)]
    model: PathBuf,
    /// Recognise special tokens (`<|im_start|>`, ...) written in the text.
    #[arg(long)]
    special: bool,
}

fn main() -> ExitCode {
    // Errors are reported as one line; a bug (panic) too, never a backtrace or a signal.
    std::panic::set_hook(Box::new(|info| {
        let p = info.payload();
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        eprintln!("phi4: internal error: {msg}");
    }));
    let cli = Cli::parse();
    let result = std::panic::catch_unwind(|| match cli.cmd {
        Cmd::Run(a) => commands::run::run(a),
        Cmd::Serve(a) => serve::serve(a),
        Cmd::Tokenize(a) => commands::tokenize(a),
        Cmd::Synth(a) => commands::synth::synth(a),
        Cmd::Info(a) => commands::info(a),
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
