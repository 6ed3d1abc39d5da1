//! The cl100k_base pre-tokenizer (llama.cpp's `dbrx`), by hand: the text cut into the pieces
//! that BPE then encodes one by one. It is exactly tiktoken's pattern
//!
//! ```text
//! (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//! ```
//!
//! matched leftmost-first at each position, as a regex engine would — but in one pass, with no
//! backtracking: a regex engine backtracks through a whitespace run for `\s*[\r\n]+` and
//! `\s+(?!\S)`, and gives up on long runs (a backtracking limit), which no input makes this do.
//! The character classes are regex-syntax's Unicode tables, those of the reference
//! implementations.

use std::sync::OnceLock;

use regex_syntax::hir::{Class, HirKind};

/// Pieces of `text`, in order; together they are the whole text.
pub fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let rest = &text[at..];
        let n = piece_len(rest);
        (n > 0).then(|| {
            at += n;
            &rest[..n]
        })
    })
}

/// The byte length of the piece at the start of `s` (0 only when `s` is empty).
fn piece_len(s: &str) -> usize {
    let cs = classes();
    let mut it = s.char_indices();
    let Some((_, c)) = it.next() else { return 0 };
    let next = s[c.len_utf8()..].chars().next();
    // 's 't 're 've 'm 'll 'd, any case
    if c == '\'' {
        if let Some(n) = contraction(&s[1..]) {
            return 1 + n;
        }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if cs.letter(c) {
        return c.len_utf8() + run(&s[c.len_utf8()..], |c| cs.letter(c));
    }
    if c != '\r' && c != '\n' && !cs.number(c) && next.is_some_and(|n| cs.letter(n)) {
        return c.len_utf8() + run(&s[c.len_utf8()..], |c| cs.letter(c));
    }
    // \p{N}{1,3}
    if cs.number(c) {
        return s
            .chars()
            .take(3)
            .take_while(|&c| cs.number(c))
            .map(char::len_utf8)
            .sum();
    }
    // ' '?[^\s\p{L}\p{N}]+[\r\n]*
    let other = |c: char| !cs.space(c) && !cs.letter(c) && !cs.number(c);
    let start = usize::from(c == ' ');
    let symbols = run(&s[start..], other);
    if symbols > 0 {
        let end = start + symbols;
        return end + run(&s[end..], |c| c == '\r' || c == '\n');
    }
    // The whitespace alternatives: c is whitespace here.
    let space = run(s, |c| cs.space(c));
    let run_text = &s[..space];
    // \s*[\r\n]+ : up to the run's last line break
    if let Some(k) = run_text.rfind(['\r', '\n']) {
        return k + 1;
    }
    // \s+(?!\S) : the run, but its last character when a non-space follows
    let last = run_text.chars().next_back().map_or(0, char::len_utf8);
    if space == s.len() || space > last {
        return if space == s.len() {
            space
        } else {
            space - last
        };
    }
    // \s+
    space
}

/// The length of the contraction (after its apostrophe) at the start of `s`, if one is there.
fn contraction(s: &str) -> Option<usize> {
    // Case-insensitively as the regex matches: with Unicode's simple case folding, where 'ſ'
    // (U+017F) is an 's'.
    let fold = |c: char| match c {
        'ſ' => 's',
        c => c.to_ascii_lowercase(),
    };
    let mut chars = s.chars();
    let a = chars.next().map(fold)?;
    let b = chars.next().map(fold);
    let first = s.chars().next().map_or(0, char::len_utf8);
    match (a, b) {
        ('s' | 't' | 'm' | 'd', _) => Some(first),
        ('r' | 'v', Some('e')) | ('l', Some('l')) => {
            Some(first + s[first..].chars().next().map_or(0, char::len_utf8))
        }
        _ => None,
    }
}

/// Bytes of the longest prefix of `s` whose characters are all `f`'s.
fn run(s: &str, f: impl Fn(char) -> bool) -> usize {
    s.char_indices()
        .find(|&(_, c)| !f(c))
        .map_or(s.len(), |(i, _)| i)
}

/// `\p{L}`, `\p{N}` and `\s` as sorted ranges.
struct Classes {
    letter: Vec<(char, char)>,
    number: Vec<(char, char)>,
    space: Vec<(char, char)>,
}

fn classes() -> &'static Classes {
    static C: OnceLock<Classes> = OnceLock::new();
    C.get_or_init(|| Classes {
        letter: ranges(r"\p{L}"),
        number: ranges(r"\p{N}"),
        space: ranges(r"\s"),
    })
}

fn ranges(class: &str) -> Vec<(char, char)> {
    let hir = regex_syntax::Parser::new()
        .parse(class)
        .expect("a valid class");
    match hir.kind() {
        HirKind::Class(Class::Unicode(u)) => {
            u.ranges().iter().map(|r| (r.start(), r.end())).collect()
        }
        other => unreachable!("{class} is a Unicode class, not {other:?}"),
    }
}

fn contains(ranges: &[(char, char)], c: char) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

impl Classes {
    fn letter(&self, c: char) -> bool {
        if c.is_ascii() {
            return c.is_ascii_alphabetic();
        }
        contains(&self.letter, c)
    }
    fn number(&self, c: char) -> bool {
        if c.is_ascii() {
            return c.is_ascii_digit();
        }
        contains(&self.number, c)
    }
    fn space(&self, c: char) -> bool {
        if c.is_ascii() {
            return matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r');
        }
        contains(&self.space, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<&str> {
        pieces(s).collect()
    }

    #[test]
    fn pieces_as_the_pattern_cuts_them() {
        assert_eq!(split("Hello world"), ["Hello", " world"]);
        assert_eq!(
            split("I'm here, they'LL see"),
            ["I", "'m", " here", ",", " they", "'LL", " see"]
        );
        assert_eq!(split("12345 x"), ["123", "45", " x"]);
        assert_eq!(split("a  b"), ["a", " ", " b"]);
        assert_eq!(split("a \n\n b"), ["a", " \n\n", " b"]);
        assert_eq!(split("x!!\n\ny"), ["x", "!!\n\n", "y"]);
        assert_eq!(split(" !? \t"), [" !?", " \t"]);
        assert_eq!(split("\tfoo"), ["\tfoo"]);
        assert_eq!(split("end  "), ["end", "  "]);
    }

    #[test]
    fn a_long_run_is_one_piece_and_a_pass() {
        let text = format!("Hello world{}a", " ".repeat(2_000_000));
        let p = split(&text);
        assert_eq!(p.len(), 4);
        assert_eq!(p[2].len(), 1_999_999);
        assert_eq!(p[3], " a");
        assert_eq!(p.concat(), text);
    }
}
