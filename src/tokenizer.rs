//! Tokenizer: byte-level BPE from the GGUF's own tokens, merges and token types, with the
//! `dbrx` (cl100k_base) pre-tokenizer; and the streaming detokenizer.
//!
//! Special tokens (control tokens such as `<|im_start|>`) are recognised in text only when the
//! caller asks; otherwise their text is ordinary text and tokenizes as such.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::gguf::{Gguf, GgufError};
use crate::hash::Map;
use crate::pretokenizer;

/// Why a vocabulary cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    #[error("{0}")]
    Gguf(#[from] GgufError),
    #[error("tokenizer: {0}")]
    Bad(String),
}

/// `tokenizer.ggml.pre` values whose pre-tokenizer is cl100k_base's ([`crate::pretokenizer`]).
const CL100K_PRE: &[&str] = &["dbrx", "llama3", "llama-v3", "llama-bpe", "smaug-bpe"];

/// Token types, numbered as llama.cpp writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i32(v: i32) -> Option<TokenType> {
        Some(match v {
            0 | 1 => TokenType::Normal, // 0: undefined, treated as normal (llama.cpp does)
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return None,
        })
    }
}

pub struct Tokenizer {
    /// Raw bytes each token stands for (control tokens: their text, never printed by default).
    pieces: Vec<Vec<u8>>,
    types: Vec<TokenType>,
    /// Token text (in the GPT-2 byte-to-unicode alphabet) → id.
    by_text: Map<String, u32>,
    /// (left, right) → (merge rank, merged token).
    merges: Map<(u32, u32), (u32, u32)>,
    /// The token of each single byte.
    byte_token: [u32; 256],
    /// Control and user-defined tokens, longest text first (for matching in text).
    specials: Vec<(Vec<u8>, u32, TokenType)>,
    /// Which bytes start some special token (most text is passed over with one look-up a byte).
    special_start: [bool; 256],
    /// `<|endoftext|>` and `<|im_end|>` when the vocabulary has them.
    pub end_of_generation: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tokenizer({} tokens, {} merges)",
            self.pieces.len(),
            self.merges.len()
        )
    }
}

impl Tokenizer {
    /// Build from a GGUF's `tokenizer.*` keys. `n_vocab` is the model's (token_embd rows).
    pub fn from_gguf(g: &Gguf, n_vocab: usize) -> Result<Tokenizer, VocabError> {
        let bad = |m: String| VocabError::Bad(m);
        let model = g.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(bad(format!("tokenizer.ggml.model {model:?} is not supported (phi4 reads byte-level BPE, \"gpt2\")")));
        }
        let pre = g.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        if !CL100K_PRE.contains(&pre) {
            return Err(bad(format!(
                "tokenizer.ggml.pre {pre:?} is not supported (phi4 implements Phi-4's \"dbrx\")"
            )));
        }
        let tokens = g.strings("tokenizer.ggml.tokens")?;
        if tokens.len() != n_vocab {
            return Err(bad(format!(
                "{} tokens for a model with {n_vocab} embedding rows",
                tokens.len()
            )));
        }
        let types: Vec<TokenType> = match g.get("tokenizer.ggml.token_type") {
            None => vec![TokenType::Normal; tokens.len()],
            Some(_) => {
                let raw = g.i32s("tokenizer.ggml.token_type")?;
                if raw.len() != tokens.len() {
                    return Err(bad(format!(
                        "{} token types for {} tokens",
                        raw.len(),
                        tokens.len()
                    )));
                }
                raw.iter()
                    .map(|&t| {
                        TokenType::from_i32(t).ok_or_else(|| bad(format!("unknown token type {t}")))
                    })
                    .collect::<Result<_, _>>()?
            }
        };

        let b2u = byte_to_unicode();
        let mut u2b: Map<char, u8> = Map::default();
        for (b, c) in b2u.iter().enumerate() {
            u2b.insert(*c, b as u8);
        }
        let mut by_text = Map::with_capacity_and_hasher(tokens.len(), Default::default());
        let mut pieces = Vec::with_capacity(tokens.len());
        let mut specials = Vec::new();
        for (id, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            let text = String::from_utf8(t.to_vec())
                .map_err(|_| bad(format!("token {id} is not valid UTF-8")))?;
            let piece = match ty {
                TokenType::Control
                | TokenType::UserDefined
                | TokenType::Unknown
                | TokenType::Unused => text.clone().into_bytes(),
                // Normal and byte tokens are spelled in the byte-to-unicode alphabet.
                _ => text
                    .chars()
                    .map(|c| u2b.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .ok_or_else(|| {
                        bad(format!(
                            "token {id} {text:?} is not in the byte-level alphabet"
                        ))
                    })?,
            };
            if matches!(ty, TokenType::Control | TokenType::UserDefined) && !text.is_empty() {
                specials.push((text.clone().into_bytes(), id as u32, *ty));
            }
            // The first id wins for duplicate texts (as llama.cpp's map insertion does).
            by_text.entry(text).or_insert(id as u32);
            pieces.push(piece);
        }
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        let mut byte_token = [0u32; 256];
        for (b, c) in b2u.iter().enumerate() {
            byte_token[b] = *by_text
                .get(&c.to_string())
                .ok_or_else(|| bad(format!("no token for byte {b:#04x}")))?;
        }

        let mut merges = Map::default();
        for (rank, m) in g.strings("tokenizer.ggml.merges")?.iter().enumerate() {
            let m = std::str::from_utf8(m)
                .map_err(|_| bad(format!("merge {rank} is not valid UTF-8")))?;
            let split = m
                .char_indices()
                .skip(1)
                .find(|(_, c)| *c == ' ')
                .map(|(i, _)| i);
            let Some(split) = split else {
                return Err(bad(format!("merge {rank} {m:?} has no space")));
            };
            let (l, r) = (&m[..split], &m[split + 1..]);
            let id = |s: &str| by_text.get(s).copied();
            match (id(l), id(r), by_text.get(&format!("{l}{r}")).copied()) {
                (Some(a), Some(b), Some(ab)) => {
                    merges.entry((a, b)).or_insert((rank as u32, ab));
                }
                _ => {
                    return Err(bad(format!(
                        "merge {rank} {m:?} names a token the vocabulary lacks"
                    )))
                }
            }
        }

        let end_of_generation = ["<|endoftext|>", "<|im_end|>"]
            .iter()
            .filter_map(|t| by_text.get(*t).copied())
            .collect();
        let mut special_start = [false; 256];
        specials
            .iter()
            .for_each(|(text, _, _)| special_start[text[0] as usize] = true);
        Ok(Tokenizer {
            pieces,
            types,
            by_text,
            merges,
            byte_token,
            specials,
            special_start,
            end_of_generation,
        })
    }

    /// The tokenizer of the GGUF file at `path`, reading only its header (not the weights).
    pub fn load(path: &std::path::Path) -> Result<Tokenizer, VocabError> {
        let g = crate::gguf::parse_file(path)?;
        let n_vocab = g.strings("tokenizer.ggml.tokens")?.len();
        Tokenizer::from_gguf(&g, n_vocab)
    }

    pub fn n_vocab(&self) -> usize {
        self.pieces.len()
    }

    /// The id of a token spelled `text` (e.g. `"<|im_start|>"`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text).copied()
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Token ids of `text`. With `special`, control tokens written in the text (`<|im_end|>`)
    /// become their ids; without, they are plain text. User-defined tokens are always matched.
    pub fn encode(&self, text: &str, special: bool) -> Vec<u32> {
        self.encode_cancellable(text, special, &AtomicBool::new(false))
            .expect("never cancelled")
    }

    /// Token ids of arbitrary bytes (no special tokens): the valid UTF-8 runs as
    /// [`Tokenizer::encode`] does, each invalid byte as its byte token.
    pub fn encode_bytes(&self, bytes: &[u8]) -> Vec<u32> {
        let mut out = Vec::new();
        for chunk in bytes.utf8_chunks() {
            out.extend(self.encode(chunk.valid(), false));
            out.extend(chunk.invalid().iter().map(|&b| self.byte_token[b as usize]));
        }
        out
    }

    /// As [`Tokenizer::encode`], giving up (`None`) soon after `cancel` is set: it is checked
    /// between pieces of the text, so a cancel reaches even megabytes of input.
    pub fn encode_cancellable(
        &self,
        text: &str,
        special: bool,
        cancel: &AtomicBool,
    ) -> Option<Vec<u32>> {
        let mut out = Vec::new();
        let bytes = text.as_bytes();
        let mut start = 0;
        let mut i = 0;
        while i < bytes.len() {
            if !self.special_start[bytes[i] as usize] {
                i += 1;
                continue;
            }
            let hit = self
                .specials
                .iter()
                .filter(|(_, _, ty)| special || *ty == TokenType::UserDefined)
                .find(|(s, _, _)| bytes[i..].starts_with(s));
            match hit {
                Some((s, id, _)) => {
                    self.encode_plain(&text[start..i], &mut out, cancel)?;
                    out.push(*id);
                    i += s.len();
                    start = i;
                }
                None => i += 1,
            }
        }
        self.encode_plain(&text[start..], &mut out, cancel)?;
        Some(out)
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>, cancel: &AtomicBool) -> Option<()> {
        for piece in pretokenizer::pieces(text) {
            if cancel.load(Ordering::Relaxed) {
                return None;
            }
            self.bpe(piece.as_bytes(), out);
        }
        Some(())
    }

    /// Byte-level BPE of one pre-token: start from byte tokens and repeatedly merge the adjacent
    /// pair with the lowest merge rank (the leftmost of equals). The parts are a linked list and
    /// the candidate pairs a heap, so a word of n bytes takes O(n log n), however long.
    fn bpe(&self, word: &[u8], out: &mut Vec<u32>) {
        const NONE: usize = usize::MAX;
        // Positions are packed into 32 bits; no real pre-token comes near that.
        if word.len() > u32::MAX as usize {
            let (a, b) = word.split_at(u32::MAX as usize / 2);
            self.bpe(a, out);
            return self.bpe(b, out);
        }
        let mut tok: Vec<u32> = word.iter().map(|&b| self.byte_token[b as usize]).collect();
        if tok.len() < 2 {
            out.extend(tok);
            return;
        }
        let n = tok.len();
        let mut next: Vec<usize> = (1..=n).map(|j| if j == n { NONE } else { j }).collect();
        let mut prev: Vec<usize> = (0..n).map(|j| if j == 0 { NONE } else { j - 1 }).collect();
        // Candidates as rank << 32 | left position, smallest first. A popped candidate is stale
        // when the pair now at its position has another rank (ranks are unique per pair).
        let rank_at = |tok: &[u32], next: &[usize], i: usize| -> Option<(u32, u32)> {
            let j = next[i];
            (j != NONE)
                .then(|| self.merges.get(&(tok[i], tok[j])).copied())
                .flatten()
        };
        let mut heap: BinaryHeap<Reverse<u64>> = (0..n - 1)
            .filter_map(|i| {
                rank_at(&tok, &next, i).map(|(r, _)| Reverse((r as u64) << 32 | i as u64))
            })
            .collect();
        while let Some(Reverse(c)) = heap.pop() {
            let (rank, i) = ((c >> 32) as u32, (c & 0xFFFF_FFFF) as usize);
            let Some((r, merged)) = rank_at(&tok, &next, i) else {
                continue;
            };
            if r != rank || tok[i] == u32::MAX {
                continue;
            }
            let j = next[i];
            tok[i] = merged;
            tok[j] = u32::MAX; // gone
            next[i] = next[j];
            if next[j] != NONE {
                prev[next[j]] = i;
            }
            for k in [prev[i], i] {
                if let Some((r, _)) = (k != NONE).then(|| rank_at(&tok, &next, k)).flatten() {
                    heap.push(Reverse((r as u64) << 32 | k as u64));
                }
            }
        }
        let mut i = 0;
        while i != NONE {
            out.push(tok[i]);
            i = next[i];
        }
    }

    /// The bytes a token stands for; control tokens give nothing unless `special`.
    pub fn piece(&self, id: u32, special: bool) -> &[u8] {
        match (self.types.get(id as usize), special) {
            (None, _) => &[],
            (Some(TokenType::Control | TokenType::Unknown | TokenType::Unused), false) => &[],
            _ => &self.pieces[id as usize],
        }
    }

    /// Text of a whole token sequence (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.piece(i, special).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The GPT-2 byte-to-unicode table used by byte-level BPE vocabularies.
pub fn byte_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

/// Turns a token stream into text pieces that are always whole UTF-8 characters: bytes of a
/// character split across tokens are held back until it is complete.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Add a token's bytes; returns the text that is now complete (possibly empty). Bytes that
    /// can never become a character come out as U+FFFD; an unfinished character at the end is
    /// held back for the next token.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("valid up to here"),
                    );
                    match e.error_len() {
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(n) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + n);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still held back (an unfinished character), replaced.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
