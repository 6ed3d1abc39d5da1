//! The chat formatter on arbitrary conversations: its tokens decode to exactly the rendered
//! template, and text that looks like a role marker never becomes one.

use std::sync::OnceLock;

use phi4::chat::{self, Markers, Message, Role};
use phi4::tokenizer::Tokenizer;

fn vocab() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::load(super::fixture("phi4-vocab.gguf").as_ref()).unwrap())
}

/// The check of one input.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // Messages separated by '\u{1}', the role from each message's first character.
    let msgs: Vec<Message> = text
        .split('\u{1}')
        .take(16)
        .map(|m| {
            let role = match m.chars().next() {
                Some('s') => Role::System,
                Some('a') => Role::Assistant,
                _ => Role::User,
            };
            Message::new(role, m)
        })
        .collect();
    let tok = vocab();
    let markers = Markers::of(tok).unwrap();
    let ids = chat::tokens(tok, markers, &msgs, true);
    assert_eq!(tok.decode(&ids, true), chat::render(&msgs, true));
    let starts = ids.iter().filter(|&&i| i == markers.im_start).count();
    assert_eq!(starts, msgs.len() + 1, "a marker was forged");
}
