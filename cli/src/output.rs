//! What the CLI prints of a reply: plain text (the default) or NDJSON events (`--json`) — a
//! sink each, behind one trait — and the timings of `--verbose` / `/set verbose`.

use std::io::{self, Write};

use phi4::chat::Message;
use phi4::{GenerateParams, Outcome, Session};
use serde_json::json;

/// Where a reply goes as it is generated.
pub trait Sink {
    /// A piece of the reply's text.
    fn piece(&mut self, text: &str) -> io::Result<()>;
    /// A generated token id (raw mode).
    fn token(&mut self, id: u32) -> io::Result<()>;
    /// The reply has ended.
    fn done(&mut self, o: &Outcome) -> io::Result<()>;
}

/// The sink `--json` asks for.
pub fn sink(json: bool) -> Box<dyn Sink> {
    if json {
        Box::new(Ndjson)
    } else {
        Box::new(Text)
    }
}

/// Text as it comes, token ids separated by spaces, a newline at the end.
pub struct Text;

impl Sink for Text {
    fn piece(&mut self, text: &str) -> io::Result<()> {
        let mut o = io::stdout().lock();
        o.write_all(text.as_bytes())?;
        o.flush()
    }
    fn token(&mut self, id: u32) -> io::Result<()> {
        self.piece(&format!("{id} "))
    }
    fn done(&mut self, _: &Outcome) -> io::Result<()> {
        writeln!(io::stdout().lock())
    }
}

/// One JSON object per line: `{"piece": …}` or `{"token": …}`, then a summary with Ollama's
/// field names.
pub struct Ndjson;

fn line(v: serde_json::Value) -> io::Result<()> {
    let mut o = io::stdout().lock();
    writeln!(o, "{v}")?;
    o.flush()
}

impl Sink for Ndjson {
    fn piece(&mut self, text: &str) -> io::Result<()> {
        line(json!({ "piece": text }))
    }
    fn token(&mut self, id: u32) -> io::Result<()> {
        line(json!({ "token": id }))
    }
    fn done(&mut self, o: &Outcome) -> io::Result<()> {
        let t = &o.timings;
        let mut v = json!({
            "done": true,
            "done_reason": o.reason.as_str(),
            "load_duration": t.load_duration,
            "prompt_eval_count": t.prompt_eval_count,
            "prompt_eval_duration": t.prompt_eval_duration,
            "eval_count": t.eval_count,
            "eval_duration": t.eval_duration,
        });
        if o.dropped_messages > 0 {
            v["dropped_messages"] = json!(o.dropped_messages);
        }
        if t.drafted > 0 {
            v["draft_count"] = json!(t.drafted);
            v["draft_accepted"] = json!(t.accepted);
            v["draft_duration"] = json!(t.draft_duration);
        }
        line(v)
    }
}

/// Ollama's `--verbose` block, on stderr.
pub fn print_timings(o: &Outcome) {
    let t = &o.timings;
    let rate = |n: usize, ns: u64| {
        if ns > 0 {
            n as f64 / (ns as f64 / 1e9)
        } else {
            0.0
        }
    };
    eprintln!("load duration:        {:.3}s", t.load_duration as f64 / 1e9);
    eprintln!("prompt eval count:    {} token(s)", t.prompt_eval_count);
    eprintln!(
        "prompt eval duration: {:.3}s",
        t.prompt_eval_duration as f64 / 1e9
    );
    eprintln!(
        "prompt eval rate:     {:.2} tokens/s",
        rate(t.prompt_eval_count, t.prompt_eval_duration)
    );
    eprintln!("eval count:           {} token(s)", t.eval_count);
    eprintln!("eval duration:        {:.3}s", t.eval_duration as f64 / 1e9);
    eprintln!(
        "eval rate:            {:.2} tokens/s",
        rate(t.eval_count, t.eval_duration)
    );
    if t.drafted > 0 {
        eprintln!(
            "draft accepted:       {} of {} token(s) ({:.0}%; {} step(s) for {} token(s), drafting {:.3}s)",
            t.accepted,
            t.drafted,
            100.0 * t.accepted as f64 / t.drafted as f64,
            t.eval_count - t.accepted,
            t.eval_count,
            t.draft_duration as f64 / 1e9
        );
    }
}

/// Generate one reply, streaming it to `sink`.
pub fn reply(
    session: &mut Session,
    messages: &[Message],
    gp: &GenerateParams,
    sink: &mut dyn Sink,
) -> crate::Res<Outcome> {
    let mut on_piece =
        |_: Option<&phi4::Token>, piece: &str| piece.is_empty() || sink.piece(piece).is_ok();
    let outcome = session.chat(messages, gp, &mut on_piece)?;
    sink.done(&outcome)?;
    Ok(outcome)
}
