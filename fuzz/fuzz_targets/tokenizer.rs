//! The tokenizer (Phi-4's real vocabulary) on arbitrary text: the ids decode back to the text,
//! and no input takes super-linear time: a time budget per input fails the target (the
//! quadratic BPE this replaced took 24 s for 64 KB of one letter).
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use phi4::tokenizer::Tokenizer;

fn vocab() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let t = Tokenizer::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/phi4-vocab.gguf").as_ref()).unwrap();
        t.encode("warm up the pre-tokenizer's caches <|im_start|>", true);
        t
    })
}

/// Generous for instrumented code: 50 ms plus 20 µs per byte.
fn budget(len: usize) -> Duration {
    Duration::from_millis(50) + Duration::from_micros(20 * len as u64)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let special = mode & 1 == 1;
    let tok = vocab();
    let t = Instant::now();
    let ids = tok.encode(&text, special);
    let took = t.elapsed();
    assert!(took <= budget(text.len()), "{} bytes took {took:?}", text.len());
    assert_eq!(tok.decode(&ids, special), text, "round trip");
});
