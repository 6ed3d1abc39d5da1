//! The interactive chat loop of `phi4 run`, modelled on `ollama run`.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::path::Path;

use phi4::chat::{self, Markers, Message, Role};
use phi4::{GenerateParams, Session};

use crate::describe::describe;
use crate::options::{describe_format, parse_format};
use crate::output::{print_timings, reply, Sink};
use crate::Res;

const HELP: &str = "Available commands:
  /set parameter NAME VALUE   set a generation option (/show parameters lists them)
  /set system TEXT            set the system message
  /set format json|SCHEMA     reply in JSON (any object, or valid against a JSON Schema)
  /set noformat               reply in free text
  /set verbose | quiet        show timings after each reply, or not
  /show info|parameters|system
  /save FILE                  save the session (its evaluated tokens) to FILE
  /load FILE                  restore a saved session and its conversation
  /clear                      forget the conversation
  /bye                        exit
Use \"\"\" to begin and end a multi-line message. Ctrl-C stops a reply; Ctrl-D exits.";

/// What the REPL's commands change.
struct State<'a> {
    session: &'a mut Session,
    model_path: &'a Path,
    messages: Vec<Message>,
    gp: GenerateParams,
    verbose: bool,
}

pub fn run(
    session: &mut Session,
    model_path: &Path,
    messages: Vec<Message>,
    gp: GenerateParams,
    mut sink: Box<dyn Sink>,
    verbose: bool,
) -> Res {
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
    let mut st = State {
        session,
        model_path,
        messages,
        gp,
        verbose,
    };
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
                    std::io::stderr().flush().ok();
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
            match command(input.trim(), &mut st) {
                Flow::Continue => continue,
                Flow::Exit => return Ok(()),
            }
        }
        st.messages.push(Message::new(Role::User, input));
        generating.store(true, Ordering::Relaxed);
        let result = reply(st.session, &st.messages, &st.gp, sink.as_mut());
        generating.store(false, Ordering::Relaxed);
        match result {
            Ok(out) => {
                st.messages
                    .push(Message::new(Role::Assistant, out.text.clone()));
                if out.dropped_messages > 0 {
                    eprintln!(
                        "(dropped the {} oldest message(s) to fit the context)",
                        out.dropped_messages
                    );
                    let first =
                        usize::from(st.messages.first().is_some_and(|m| m.role == Role::System));
                    st.messages.drain(first..first + out.dropped_messages);
                }
                if st.verbose {
                    print_timings(&out);
                }
            }
            Err(e) => {
                st.messages.pop();
                eprintln!("error: {e}");
            }
        }
    }
}

enum Flow {
    Continue,
    Exit,
}

/// What follows a command's first `words` words (a message, a path, a schema), trimmed.
fn argument(line: &str, words: usize) -> &str {
    line.splitn(words + 1, ' ').nth(words).unwrap_or("").trim()
}

fn command(line: &str, st: &mut State<'_>) -> Flow {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["/bye"] | ["/exit"] => return Flow::Exit,
        ["/?"] | ["/help"] => eprintln!("{HELP}"),
        ["/clear"] => {
            st.messages.retain(|m| m.role == Role::System);
            st.session.reset();
            eprintln!("Cleared session context");
        }
        ["/set", "system", ..] => {
            let text = argument(line, 2).to_string();
            st.messages.retain(|m| m.role != Role::System);
            st.messages.insert(0, Message::new(Role::System, text));
            eprintln!("Set system message.");
        }
        ["/set", "verbose"] => {
            st.verbose = true;
            eprintln!("Set 'verbose' mode.");
        }
        ["/set", "quiet"] => {
            st.verbose = false;
            eprintln!("Set 'quiet' mode.");
        }
        ["/save", _, ..] => {
            let path = argument(line, 1);
            match st.session.save(path.as_ref(), usize::MAX) {
                Ok(bytes) => eprintln!(
                    "Saved the session ({} tokens, {:.1} MiB) to {path}.",
                    st.session.history().len(),
                    bytes as f64 / 1048576.0
                ),
                Err(e) => eprintln!("error: {e}"),
            }
        }
        ["/load", _, ..] => {
            let path = argument(line, 1);
            match st.session.load(path.as_ref()) {
                Ok(n) => {
                    let tok = st.session.model().tokenizer.clone();
                    st.messages = Markers::of(&tok)
                        .map(|m| chat::messages(&tok, m, st.session.history()))
                        .unwrap_or_default();
                    eprintln!(
                        "Loaded {n} tokens: a conversation of {} messages.",
                        st.messages.len()
                    );
                }
                Err(e) => eprintln!("error: {e}"),
            }
        }
        ["/set", "format", ..] => match parse_format(argument(line, 2)) {
            Ok(c) => {
                eprintln!("Set format to '{}'.", describe_format(c.as_ref()));
                st.gp.constraint = c;
            }
            Err(e) => eprintln!("error: {e}"),
        },
        ["/set", "noformat"] => {
            st.gp.constraint = None;
            eprintln!("Disabled format.");
        }
        ["/set", "parameter", name, value @ ..] if !value.is_empty() => {
            match st.gp.set(name, &value.join(" ")) {
                Ok(()) => eprintln!("Set parameter '{name}' to '{}'", value.join(" ")),
                Err(e) => eprintln!("error: {e}"),
            }
        }
        ["/show", "info"] => {
            for (label, value) in describe(st.session.model(), st.model_path) {
                eprintln!("  {label:<18} {value}");
            }
            eprintln!(
                "  {:<18} {} positions",
                "session context",
                st.session.n_ctx()
            );
        }
        ["/show", "parameters"] => {
            for (name, help) in GenerateParams::options() {
                eprintln!(
                    "  {name:<18} {:<10} {}",
                    st.gp.get(name).unwrap_or_default(),
                    help.trim()
                );
            }
            eprintln!(
                "  {:<18} {}",
                "format",
                describe_format(st.gp.constraint.as_ref())
            );
        }
        ["/show", "system"] => match st.messages.iter().find(|m| m.role == Role::System) {
            Some(m) => eprintln!("{}", m.content),
            None => eprintln!("No system message was specified."),
        },
        _ => eprintln!("Unknown command '{line}'. Type /? for help"),
    }
    Flow::Continue
}
