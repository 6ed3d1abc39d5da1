//! `phi4 run`: one-shot chat, raw token ids, or the REPL.

use std::io::{IsTerminal, Read};

use std::path::Path;

use phi4::chat::{self, Markers, Message, Role};
use phi4::memory::PlanParams;
use phi4::{Overflow, SamplingParams, Session, SessionParams};

use crate::output::{self, reply};
use crate::{repl, Res, RunArgs};

pub fn run(a: RunArgs) -> Res {
    let mut gp = a.options.params()?;
    gp.constraint = a.format.constraint()?;
    if a.raw {
        if a.prompt_ids.is_empty() {
            return Err("--raw needs --prompt-ids".into());
        }
        // Raw mode is for comparing engines: plain greedy/temperature sampling, no penalties.
        gp.sampling = SamplingParams {
            temperature: gp.sampling.temperature,
            seed: gp.sampling.seed,
            ..SamplingParams::greedy()
        };
    }
    let d = SessionParams::default();
    let sp = SessionParams {
        n_ctx: a.ctx_size.unwrap_or(d.n_ctx),
        n_batch: a.batch.unwrap_or(d.n_batch),
        n_threads: a.threads.unwrap_or(d.n_threads),
        overflow: if a.drop_oldest {
            Overflow::DropOldest
        } else {
            Overflow::Error
        },
        kv_type: a.kv_type.unwrap_or(d.kv_type),
    };
    sp.check()?;
    let plan = PlanParams {
        n_ctx: sp.n_ctx,
        kv_type: sp.kv_type,
        sessions: 1,
        n_batch: sp.n_batch,
        n_threads: sp.n_threads,
    };
    phi4_cli::memory::check(&a.model, !a.no_repack, &plan, a.skip_memory_check)?;
    let model = super::load(&a.model, !a.no_repack)?;
    let mut session = Session::new(model, &sp)?;
    if session.n_threads() < sp.n_threads {
        eprintln!(
            "phi4: --threads {} is more than the {} CPUs here: using {}",
            sp.n_threads,
            session.n_threads(),
            session.n_threads()
        );
    }
    let mut sink = output::sink(a.json);
    let cache = a.prompt_cache.as_deref();
    if let Some(file) = cache {
        restore(&mut session, file, a.verbose);
    }

    if a.raw {
        let mut on_token =
            |t: Option<&phi4::Token>, _: &str| t.is_none_or(|t| sink.token(t.id).is_ok());
        let outcome = session.generate(&a.prompt_ids, &gp, &mut on_token)?;
        if let Some(file) = cache {
            save_prompt(
                &session,
                a.prompt_ids.len(),
                outcome.timings.prompt_eval_count,
                file,
                a.verbose,
            );
        }
        sink.done(&outcome)?;
        return Ok(());
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
            stdin
                .lock()
                .read_to_string(&mut s)
                .map_err(|e| format!("stdin: {e}"))?;
            Some(s)
        }
        None => None,
    };
    match prompt {
        Some(p) => {
            messages.push(Message::new(Role::User, p));
            let out = reply(&mut session, &messages, &gp, sink.as_mut())?;
            if let Some(file) = cache {
                let tok = session.model().tokenizer.clone();
                let n = chat::tokens(&tok, Markers::of(&tok)?, &messages, true).len();
                save_prompt(&session, n, out.timings.prompt_eval_count, file, a.verbose);
            }
            if a.verbose && !a.json {
                output::print_timings(&out);
            }
            Ok(())
        }
        None => {
            if let Some(file) = cache.filter(|_| !messages.is_empty()) {
                // The system message, evaluated (what the restored state lacks of it) and kept.
                let tok = session.model().tokenizer.clone();
                let system = chat::tokens(&tok, Markers::of(&tok)?, &messages, false);
                let evaluated = session.warm(&system)?;
                save_prompt(&session, system.len(), evaluated, file, a.verbose);
            }
            repl::run(&mut session, &a.model, messages, gp, sink, a.verbose)
        }
    }
}

/// `--prompt-cache`: restore the saved state if there is one (one that cannot be used is
/// reported and ignored: the prompt is evaluated as if there were none).
fn restore(session: &mut Session, file: &Path, verbose: bool) {
    if !file.exists() {
        return;
    }
    match session.load(file) {
        Ok(n) if verbose => eprintln!(
            "phi4: --prompt-cache: restored {n} tokens from {}",
            file.display()
        ),
        Ok(_) => {}
        Err(e) => eprintln!("phi4: --prompt-cache: not used: {e}"),
    }
}

/// `--prompt-cache`: save the first `n` cached tokens (the prompt), unless nothing of it was
/// evaluated beyond what the state held (the last token is always evaluated again). A save that
/// fails is reported; the reply was given.
fn save_prompt(session: &Session, n: usize, evaluated: usize, file: &Path, verbose: bool) {
    if evaluated <= 1 && file.exists() {
        return;
    }
    match session.save(file, n) {
        Ok(bytes) if verbose => eprintln!(
            "phi4: --prompt-cache: saved {n} tokens ({:.1} MiB) to {}",
            bytes as f64 / 1048576.0,
            file.display()
        ),
        Ok(_) => {}
        Err(e) => eprintln!("phi4: --prompt-cache: not saved: {e}"),
    }
}
