//! The tokenizer (Phi-4's real vocabulary) on arbitrary text: the ids decode back to the text,
//! and no input takes super-linear time: a time budget per input fails the target (the
//! quadratic BPE this replaced took 24 s for 64 KB of one letter).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use phi4::tokenizer::Tokenizer;

fn vocab() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let t = Tokenizer::load(super::fixture("phi4-vocab.gguf").as_ref()).unwrap();
        t.encode("warm up the pre-tokenizer's caches <|im_start|>", true);
        t
    })
}

/// Generous for instrumented code on a busy machine: 100 ms plus 50 µs per byte (64 KB: 3.4 s).
fn budget(len: usize) -> Duration {
    Duration::from_millis(100) + Duration::from_micros(50 * len as u64)
}

/// The check of one input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let special = mode & 1 == 1;
    let tok = vocab();
    let t = Instant::now();
    let ids = tok.encode(&text, special);
    // Over budget: time it twice more, so that a moment of load elsewhere is not a finding;
    // super-linear work is over budget every time.
    let took = (0..2).fold(t.elapsed(), |best, _| {
        if best <= budget(text.len()) {
            return best;
        }
        let t = Instant::now();
        tok.encode(&text, special);
        best.min(t.elapsed())
    });
    assert!(
        took <= budget(text.len()),
        "{} bytes took {took:?} (best of 3)",
        text.len()
    );
    assert_eq!(tok.decode(&ids, special), text, "round trip");
}
