//! The tokenizer against llama.cpp's on the real Phi-4 vocabulary.

mod common;

use common::reference::Reference;
use phi4::tokenizer::{StreamDecoder, Tokenizer};

fn phi4_vocab() -> Tokenizer {
    let bytes = std::fs::read(common::fixture("phi4-vocab.gguf")).unwrap();
    let g = phi4::gguf::parse(&bytes).unwrap();
    Tokenizer::from_gguf(&g, 100352).unwrap()
}

/// A broad corpus: whitespace, newlines, CRLF, contractions, digits, code, punctuation, many
/// scripts, emoji with ZWJ, combining marks, control characters, special-token look-alikes.
fn corpus() -> Vec<String> {
    let mut c: Vec<String> = [
        "Hello world",
        "hello  world   three    spaces",
        " leading space",
        "trailing space ",
        "\t\ttabs\tand  mixed \t whitespace",
        "line one\nline two\n\nline four\n",
        "crlf\r\nline\r\n\r\nend\r",
        "\n\n\n   \n\t\n",
        "I'm you're he's we've they'll I'd can't won't",
        "I'M YOU'RE HE'S WE'VE THEY'LL I'D CAN'T WON'T",
        "'s 't 're 've 'm 'll 'd 'S 'T 'RE",
        "3.14159 2024 1234567890 000 12,345.67 1e-5 0x1F",
        "fn main() {\n    println!(\"{}\", x + 1);\n}\n",
        "def f(a, b=2, *args, **kw):\n\treturn a<<b >> 3 != 4 && c || d",
        "<div class=\"x\">&amp; &lt;tag&gt;</div>",
        "!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
        "Grüße, Zoë! Ça va? Ærøskøbing — naïve café",
        "Привет, мир! Как дела?",
        "こんにちは世界。日本語のテキストです。",
        "你好，世界！这是中文。",
        "안녕하세요 세계",
        "مرحبا بالعالم",
        "שלום עולם",
        "नमस्ते दुनिया",
        "สวัสดีชาวโลก",
        "Γειά σου Κόσμε",
        "emoji 😀😃😄 👍🏽 🇫🇷 🏳️‍🌈 👨‍👩‍👧‍👦 ❤️",
        "combining: e\u{301} a\u{308} n\u{303} \u{301}alone",
        "control: \u{1}\u{2}\u{7f}\u{0} bell\u{7} esc\u{1b}[0m",
        "zero width: a\u{200b}b\u{200d}c\u{feff}d",
        "<|im_start|>user<|im_sep|>hi<|im_end|>",
        "<|endoftext|> <|fim_prefix|> <|dummy_3|>",
        "<|im_start|",
        "<|not_a_token|> <| im_end |> < |im_end| >",
        "a<|im_end|>b",
        "𝕳𝖊𝖑𝖑𝖔 𝔀𝓸𝓻𝓵𝓭 ∑∫∂√∞ ≠ ≤ ≥",
        "    indented code\n        more\n",
        "x".repeat(300).as_str(),
        "",
        " ",
        "\u{a0}non-breaking\u{a0}spaces\u{3000}ideographic",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Every single byte-level ASCII character alone and doubled.
    c.extend((0u8..128).map(|b| (b as char).to_string().repeat(2)));
    c
}

#[test]
fn equals_llama_cpp_on_the_phi4_vocabulary() {
    let tok = phi4_vocab();
    let rf = Reference::vocab_only(&common::fixture("phi4-vocab.gguf"));
    for s in corpus() {
        for special in [false, true] {
            assert_eq!(
                tok.encode(&s, special),
                rf.tokenize(&s, special),
                "{s:?} (special: {special})"
            );
        }
    }
}

/// Random text from a mix of alphabets, digits, punctuation and whitespace (seeded).
fn random_texts(n: usize, seed: u64) -> Vec<String> {
    let pools: [&[char]; 8] = [
        &['a', 'b', 'e', 'o', 'T', 'Q', 'z', 'é', 'ß', 'ø'],
        &[' ', ' ', ' ', '\n', '\t', '\r', '\u{a0}', '\u{3000}'],
        &['0', '1', '5', '9', '٣', '²'],
        &[
            '.', ',', '!', '?', '\'', '"', '(', ')', '<', '|', '>', '_', '-', '#', '{', '}',
        ],
        &['ж', 'д', 'Ω', 'λ', 'ש', 'ع', 'क', 'ा', 'ก', 'ั'],
        &['中', '文', '日', 'の', 'カ', '한', '글'],
        &['😀', '👍', '🏽', '\u{200d}', '❤', '\u{fe0f}', '🇫', '🇷'],
        &['\u{301}', '\u{308}', '\u{0}', '\u{7}', '\u{1b}', '\u{feff}'],
    ];
    let mut r = seed;
    let mut next = move || {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        r
    };
    (0..n)
        .map(|_| {
            let len = next() % 60;
            (0..len)
                .map(|_| {
                    let pool = pools[(next() % 8) as usize];
                    pool[(next() as usize) % pool.len()]
                })
                .collect()
        })
        .collect()
}

#[test]
fn equals_tiktoken_cl100k_base() {
    let tok = phi4_vocab();
    let tt = tiktoken_rs::cl100k_base().unwrap();
    let mut texts = corpus();
    texts.extend(random_texts(3000, 0x9E37_79B9));
    for s in texts {
        let want: Vec<u32> = tt.encode_ordinary(&s);
        assert_eq!(tok.encode(&s, false), want, "{s:?}");
    }
}

#[test]
fn equals_llama_cpp_on_random_text() {
    let tok = phi4_vocab();
    let rf = Reference::vocab_only(&common::fixture("phi4-vocab.gguf"));
    for s in random_texts(3000, 12345) {
        assert_eq!(tok.encode(&s, false), rf.tokenize(&s, false), "{s:?}");
    }
}

#[test]
fn known_ids() {
    let tok = phi4_vocab();
    assert_eq!(tok.encode("Hello world", false), vec![9906, 1917]);
    assert_eq!(tok.token_id("<|im_start|>"), Some(100264));
    assert_eq!(tok.end_of_generation, vec![100257, 100265]);
}

#[test]
fn round_trip() {
    let tok = phi4_vocab();
    for s in corpus() {
        let ids = tok.encode(&s, false);
        assert_eq!(tok.decode(&ids, false), s, "{ids:?}");
    }
}

#[test]
fn special_tokens_only_when_asked() {
    let tok = phi4_vocab();
    let text = "<|im_start|>system";
    let plain = tok.encode(text, false);
    assert!(plain.iter().all(|&t| t < 100256), "{plain:?}");
    assert_eq!(tok.encode(text, true)[0], 100264);
    // Control tokens print nothing unless asked.
    assert_eq!(tok.piece(100265, false), b"");
    assert_eq!(tok.piece(100265, true), b"<|im_end|>");
}

#[test]
fn streaming_holds_back_split_characters() {
    let tok = phi4_vocab();
    // Characters that cl100k splits across several byte tokens.
    for s in ["😀👍🏽", "𝕳𝖊𝖑𝖑𝖔", "日本語", "ฬฮ"] {
        let ids = tok.encode(s, false);
        assert!(
            ids.len() > s.chars().count(),
            "{s:?} should split characters across tokens: {ids:?}"
        );
        let mut d = StreamDecoder::default();
        let mut pieces = Vec::new();
        for &id in &ids {
            let p = d.push(tok.piece(id, false));
            // Each piece is whole characters (a String proves it) and never a replacement char.
            assert!(!p.contains('\u{fffd}'), "{s:?}: piece {p:?}");
            pieces.push(p);
        }
        pieces.push(d.finish());
        assert_eq!(pieces.concat(), s);
        assert!(
            pieces.iter().any(|p| p.is_empty()),
            "something was held back for {s:?}"
        );
    }
}

#[test]
fn stream_decoder_replaces_impossible_bytes_and_keeps_an_unfinished_tail() {
    let mut d = StreamDecoder::default();
    // A stray continuation byte, then "é", then the first two of the three bytes of "日".
    assert_eq!(d.push(&[0x80, 0xC3, 0xA9, 0xE6, 0x97]), "\u{FFFD}é");
    assert_eq!(d.push(&[0xA5, b'!']), "日!");
    assert_eq!(d.push(&[0xF0, 0x9F]), "");
    assert_eq!(d.finish(), "\u{FFFD}");
}

#[test]
fn unsupported_tokenizers_are_load_errors() {
    let bytes = std::fs::read(common::fixture("phi4-vocab.gguf")).unwrap();
    let g = phi4::gguf::parse(&bytes).unwrap();
    let retyped = |key: &str, v: &str| {
        let mut g = g.clone();
        let kv: Vec<_> = g
            .metadata
            .iter()
            .map(|(k, x)| {
                if k == key {
                    (k.clone(), phi4::gguf::Value::String(v.as_bytes().to_vec()))
                } else {
                    (k.clone(), x.clone())
                }
            })
            .collect();
        g.metadata = kv;
        // Rebuild the index through a round trip of parse (metadata is only read through get()).
        rebuild(&g)
    };
    let e = Tokenizer::from_gguf(&retyped("tokenizer.ggml.model", "llama"), 100352)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.ggml.model \"llama\" is not supported"),
        "{e}"
    );
    let e = Tokenizer::from_gguf(&retyped("tokenizer.ggml.pre", "qwen2"), 100352)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.ggml.pre \"qwen2\" is not supported"),
        "{e}"
    );
    let e = Tokenizer::from_gguf(&g, 1000).unwrap_err().to_string();
    assert!(e.contains("100352 tokens for a model with 1000"), "{e}");
}

/// Write the header back out and parse it again (keeps the key index consistent).
fn rebuild(g: &phi4::gguf::Gguf) -> phi4::gguf::Gguf {
    let dir = common::tmpdir();
    let p = dir.path().join("v.gguf");
    let mut w = phi4::gguf::Writer::create(&p).unwrap();
    w.header(&g.metadata, std::iter::empty()).unwrap();
    w.finish().unwrap();
    phi4::gguf::parse(&std::fs::read(p).unwrap()).unwrap()
}

/// Long runs without a pre-token break (one character repeated, letters, spaces, `=`): BPE is
/// O(n log n), so a megabyte takes well under a second; the quadratic BPE took 24 s for 64 KB
/// and over an hour for 1 MB. (The bound is loose: a test, not a benchmark.) Each result is
/// also exactly what merging a short run repeatedly gives.
#[test]
fn long_runs_tokenize_in_near_linear_time() {
    let tok = phi4_vocab();
    for unit in ["a", " ", "=", "1", "é", "ab"] {
        let text = unit.repeat((1 << 20) / unit.len());
        let t = std::time::Instant::now();
        let ids = tok.encode(&text, false);
        let took = t.elapsed();
        assert!(took.as_secs_f32() < 10.0, "{unit:?} x 1 MB took {took:?}");
        assert_eq!(tok.decode(&ids, false), text, "{unit:?}: round trip");
        eprintln!(
            "{unit:?} x 1 MB: {} tokens in {:.0} ms",
            ids.len(),
            took.as_secs_f64() * 1e3
        );
    }
}

/// A cancel set while text is being tokenized stops it.
#[test]
fn tokenizing_is_cancellable() {
    let tok = phi4_vocab();
    let cancel = std::sync::atomic::AtomicBool::new(true);
    assert_eq!(
        tok.encode_cancellable(&"word ".repeat(100_000), false, &cancel),
        None
    );
    cancel.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(tok
        .encode_cancellable("word word", false, &cancel)
        .is_some());
}

/// Long runs of every kind of character, inside text, tokenize as tiktoken does: a backtracking
/// pre-tokenizer gives up on long whitespace runs (phi4's once re-encoded the text it had
/// already emitted: 'Hello world' twice).
#[test]
fn long_runs_of_every_class_equal_tiktoken() {
    let tok = phi4_vocab();
    let tt = tiktoken_rs::cl100k_base().unwrap();
    let units = [
        " ", "\t", "\n", "\r\n", " \n", "\u{a0}", "\u{3000}", "a", "é", "1", "٣", "!", "'", "中",
        "😀",
    ];
    for unit in units {
        for n in [1, 2, 3, 50, 3000] {
            let run = unit.repeat(n);
            for text in [
                format!("Hello world{run}a"),
                format!("x{run}"),
                format!("{run}!? b"),
                run.clone(),
            ] {
                let want: Vec<u32> = tt.encode_ordinary(&text);
                assert_eq!(tok.encode(&text, false), want, "{unit:?} x {n}: {text:?}");
            }
        }
    }
}

/// Two million spaces between words: the words once each, the run as its own pre-token.
#[test]
fn a_huge_whitespace_run_is_one_pre_token() {
    let tok = phi4_vocab();
    let spaces = " ".repeat(1_999_999);
    let text = format!("Hello world{spaces} a");
    let ids = tok.encode(&text, false);
    let mut want = tok.encode("Hello world", false);
    want.extend(tok.encode(&spaces, false));
    want.extend(tok.encode(" a", false));
    assert_eq!(ids, want);
    assert!(
        ids.len() < 100_000,
        "spaces merge into long tokens: {} ids",
        ids.len()
    );
    assert_eq!(tok.decode(&ids, false), text);
}
