//! Differential: phi4's tokenizer on Phi-4's vocabulary against tiktoken's cl100k_base (the
//! reference implementation of the same pre-tokenizer and merges): the ids must be the same.
//! The first byte picks the input's shape: arbitrary text, or runs of characters of every class
//! (letters, digits, whitespace, line breaks, punctuation, marks, CJK, emoji) whose lengths come
//! from the input — the shapes a pre-tokenizer gets wrong.

use std::sync::OnceLock;

use phi4::tokenizer::Tokenizer;

fn phi4() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = super::fixture("phi4-vocab.gguf");
        Tokenizer::load(path.as_ref()).unwrap()
    })
}

fn reference() -> &'static tiktoken_rs::CoreBPE {
    static T: OnceLock<tiktoken_rs::CoreBPE> = OnceLock::new();
    T.get_or_init(|| tiktoken_rs::cl100k_base().unwrap())
}

const UNITS: &[&str] = &[
    " ", "\t", "\n", "\r", "\r\n", "\u{a0}", "\u{3000}", "\u{85}", "a", "Z", "é", "ß", "ж", "1",
    "٣", "²", "!", ".", "'", "'s", "'LL", "_", "中", "の", "😀", "\u{301}", "\u{200d}", "\u{0}",
];

/// Runs: each pair of bytes is a unit and a length, up to 128 repeats (BPE over one pre-token is
/// quadratic in both implementations: longer runs would cost the fuzzer most of its executions;
/// runs of thousands and millions are tests/tokenizer.rs's `long_runs_of_every_class_equal_tiktoken`
/// and `a_huge_whitespace_run_is_one_pre_token`).
fn runs(data: &[u8]) -> String {
    data.chunks(2)
        .map(|p| {
            let unit = UNITS[p[0] as usize % UNITS.len()];
            let n = p.get(1).map_or(1, |&b| 1 + b as usize % 128);
            unit.repeat(n)
        })
        .collect()
}

/// The check of one input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = match mode % 2 {
        0 => String::from_utf8_lossy(rest).into_owned(),
        _ => runs(rest),
    };
    let want: Vec<u32> = reference().encode_ordinary(&text);
    assert_eq!(phi4().encode(&text, false), want, "{text:?}");
}
