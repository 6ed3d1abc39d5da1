//! The interactive chat loop of `phi4 run`, modelled on `ollama run`.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use phi4::chat::{Message, Role};
use phi4::session::{GenerateParams, Session};

use crate::{print_timings, reply, Res, RunArgs};

const HELP: &str = "Available commands:
  /set parameter NAME VALUE   temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                              frequency_penalty, presence_penalty, seed, num_predict, stop
  /set system TEXT            set the system message
  /show info|parameters|system
  /clear                      forget the conversation
  /bye                        exit
Use \"\"\" to begin and end a multi-line message. Ctrl-C stops a reply; Ctrl-D exits.";

pub fn run(session: &mut Session, mut messages: Vec<Message>, mut gp: GenerateParams, a: &RunArgs) -> Res {
    // Ctrl-C cancels the reply being generated, never the program.
    let generating = Arc::new(AtomicBool::new(false));
    {
        let cancel = session.cancel_flag();
        let generating = generating.clone();
        ctrlc::set_handler(move || {
            if generating.load(Ordering::Relaxed) {
                cancel.store(true, Ordering::Relaxed);
            } else {
                eprint!("\nUse Ctrl + d or /bye to exit.\n>>> ");
            }
        })
        .map_err(|e| format!("cannot handle Ctrl-C: {e}"))?;
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!(">>> ");
        std::io::stderr().flush().ok();
        let Some(line) = lines.next() else {
            eprintln!();
            return Ok(());
        };
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        let mut input = line.trim_end().to_string();
        if let Some(rest) = input.trim_start().strip_prefix("\"\"\"") {
            // Multi-line: until a line ending with """.
            let mut text = rest.to_string();
            if let Some(done) = text.strip_suffix("\"\"\"") {
                text = done.to_string();
            } else {
                loop {
                    eprint!("... ");
                    let Some(l) = lines.next() else { break };
                    let l = l.map_err(|e| format!("stdin: {e}"))?;
                    if let Some(last) = l.strip_suffix("\"\"\"") {
                        text.push('\n');
                        text.push_str(last);
                        break;
                    }
                    text.push('\n');
                    text.push_str(&l);
                }
            }
            input = text.trim_start_matches('\n').to_string();
        } else if input.trim().is_empty() {
            continue;
        } else if input.starts_with('/') {
            match command(input.trim(), session, &mut messages, &mut gp) {
                Flow::Continue => continue,
                Flow::Exit => return Ok(()),
            }
        }
        messages.push(Message::new(Role::User, input));
        generating.store(true, Ordering::Relaxed);
        let result = reply(session, &messages, &gp, a.json);
        generating.store(false, Ordering::Relaxed);
        match result {
            Ok(out) => {
                messages.push(Message::new(Role::Assistant, out.text.clone()));
                if out.dropped_messages > 0 {
                    eprintln!("(dropped the {} oldest message(s) to fit the context)", out.dropped_messages);
                    let first = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
                    messages.drain(first..first + out.dropped_messages);
                }
                if a.verbose {
                    print_timings(&out);
                }
            }
            Err(e) => {
                messages.pop();
                eprintln!("error: {e}");
            }
        }
    }
}

enum Flow {
    Continue,
    Exit,
}

fn command(line: &str, session: &mut Session, messages: &mut Vec<Message>, gp: &mut GenerateParams) -> Flow {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["/bye"] | ["/exit"] => return Flow::Exit,
        ["/?"] | ["/help"] => eprintln!("{HELP}"),
        ["/clear"] => {
            messages.retain(|m| m.role == Role::System);
            session.reset();
            eprintln!("Cleared session context");
        }
        ["/set", "system", ..] => {
            let text = line.splitn(3, ' ').nth(2).unwrap_or("").trim().to_string();
            messages.retain(|m| m.role != Role::System);
            messages.insert(0, Message::new(Role::System, text));
            eprintln!("Set system message.");
        }
        ["/set", "parameter", name, value @ ..] if !value.is_empty() => match set_param(gp, name, &value.join(" ")) {
            Ok(()) => eprintln!("Set parameter '{name}' to '{}'", value.join(" ")),
            Err(e) => eprintln!("error: {e}"),
        },
        ["/show", "info"] => {
            let m = session.model();
            let c = &m.config;
            eprintln!("  architecture        phi3 (Phi-4 family)");
            eprintln!("  layers              {}", c.n_layer);
            eprintln!("  embedding length    {}", c.n_embd);
            eprintln!("  heads / kv heads    {} / {}", c.n_head, c.n_head_kv);
            eprintln!("  vocabulary          {}", c.n_vocab);
            eprintln!("  context length      {} (session: {})", c.n_ctx_train, session.n_ctx());
            eprintln!("  file size           {:.2} GB", m.file_size as f64 / 1e9);
            eprintln!("  repacked weights    {}", m.repacked.len());
        }
        ["/show", "parameters"] => {
            let s = &gp.sampling;
            eprintln!("  temperature {}\n  top_k {}\n  top_p {}\n  min_p {}", s.temperature, s.top_k, s.top_p, s.min_p);
            eprintln!("  repeat_penalty {}\n  repeat_last_n {}", s.repeat_penalty, s.repeat_last_n);
            eprintln!("  frequency_penalty {}\n  presence_penalty {}\n  seed {}", s.frequency_penalty, s.presence_penalty, s.seed);
            eprintln!("  num_predict {}\n  stop {:?}", gp.max_tokens, gp.stop);
        }
        ["/show", "system"] => match messages.iter().find(|m| m.role == Role::System) {
            Some(m) => eprintln!("{}", m.content),
            None => eprintln!("No system message was specified."),
        },
        _ => eprintln!("Unknown command '{line}'. Type /? for help"),
    }
    Flow::Continue
}

fn set_param(gp: &mut GenerateParams, name: &str, v: &str) -> Result<(), String> {
    let mut next = gp.clone();
    let s = &mut next.sampling;
    let f = || v.parse::<f32>().map_err(|_| format!("{name} takes a number, not {v:?}"));
    let u = || v.parse::<usize>().map_err(|_| format!("{name} takes a whole number, not {v:?}"));
    match name {
        "temperature" => s.temperature = f()?,
        "top_k" => s.top_k = u()?,
        "top_p" => s.top_p = f()?,
        "min_p" => s.min_p = f()?,
        "repeat_penalty" => s.repeat_penalty = f()?,
        "repeat_last_n" => s.repeat_last_n = u()?,
        "frequency_penalty" => s.frequency_penalty = f()?,
        "presence_penalty" => s.presence_penalty = f()?,
        "seed" => s.seed = v.parse().map_err(|_| format!("seed takes a whole number, not {v:?}"))?,
        "num_predict" => next.max_tokens = u()?,
        "stop" => next.stop.push(v.to_string()),
        _ => return Err(format!("unknown parameter {name:?}")),
    }
    next.sampling.validate()?;
    *gp = next;
    Ok(())
}
