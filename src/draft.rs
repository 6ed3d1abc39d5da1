//! Drafts for speculative decoding: tokens guessed to follow the ones so far, which a decode
//! step verifies together with its own token (`Session`'s decode loop). A draft costs nothing
//! to be wrong about but the step's extra tokens; each one the model agrees with is a token
//! without a step of its own.
//!
//! [`PromptLookup`] drafts by prompt lookup: the continuation of the longest recent n-gram
//! found earlier in the session's tokens (prompt, history, the reply so far) — replies copy
//! from their input (quotes, code edits, extractions, repeated JSON keys), and a model caught
//! in a loop repeats itself.

use crate::hash::Map;

/// Something that guesses the tokens to come.
pub trait Drafter {
    /// Up to `max` tokens guessed to follow `tokens` (the session's tokens: the prompt's, then
    /// the reply's so far) into `out` (empty on entry). Within a generation `tokens` only grows.
    fn draft(&mut self, tokens: &[u32], max: usize, out: &mut Vec<u32>);

    /// How many of the last draft's tokens the model agreed with (in order, before the first
    /// it did not): a drafter may draft less after wrong guesses.
    fn verified(&mut self, _drafted: usize, _accepted: usize) {}
}

/// The shortest and longest n-grams [`PromptLookup`] matches: a single token matches too
/// often by chance; longer than four rarely adds a right draft that four misses.
const MIN_NGRAM: usize = 2;
const MAX_NGRAM: usize = 4;

/// The lengths a [`PromptLookup`] draft climbs and descends: steps of 2, 4, 8 and 16 tokens.
/// phi4's kernels take a step's tokens in register blocks of 1–4 and 8, so a step of 5 to 7
/// tokens costs about one of 8, and one of 9 about one of 8 plus one of 1 (`benches/kernels.rs`).
const LADDER: [usize; 4] = [1, 3, 7, 15];
/// The rung a generation starts on (drafts of 3: a step of 4 tokens costs little more than
/// one of 1 where phi4's kernels run).
const FIRST_RUNG: usize = 1;
/// The longest pause of lookups after drafts of one token missed (steps).
const MAX_PAUSE: usize = 16;

/// Drafts the continuation of the most recent earlier occurrence of the longest n-gram
/// (`MIN_NGRAM..=MAX_NGRAM` tokens) that ends the tokens so far. A continuation that reaches
/// the end of the tokens repeats the span between the two occurrences (a loop goes on).
///
/// The draft's length follows the verifications ([`LADDER`]): one rung up after a draft the
/// model took whole, one down after a draft it rejected first thing, and when even single
/// tokens are rejected, lookups pause for a number of steps that doubles with each further
/// miss — text that does not repeat its input costs almost no wrong drafts.
pub struct PromptLookup {
    /// Per n-gram length, the n-gram's hash → where its most recent occurrence ends.
    ends: [Map<u64, usize>; MAX_NGRAM + 1 - MIN_NGRAM],
    /// Tokens indexed so far (n-grams ending before this position).
    indexed: usize,
    /// Tokens of the last call: a shorter or different sequence starts the index again.
    seen: Vec<u32>,
    /// The next draft's length: `LADDER[rung]` (at most the caller's `max`).
    rung: usize,
    /// Steps to go without drafting, and how many the next miss of a single token pauses.
    pause: usize,
    backoff: usize,
}

impl Default for PromptLookup {
    fn default() -> PromptLookup {
        PromptLookup {
            ends: Default::default(),
            indexed: 0,
            seen: Vec::new(),
            rung: FIRST_RUNG,
            pause: 0,
            backoff: 1,
        }
    }
}

fn ngram_hash(gram: &[u32]) -> u64 {
    // FNV-1a over the tokens' bytes: n-grams are a few tokens, their hashes only bucket them
    // (a hit is compared token by token).
    gram.iter().fold(0xcbf2_9ce4_8422_2325, |h, &t| {
        t.to_le_bytes()
            .iter()
            .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
    })
}

impl PromptLookup {
    pub fn new() -> PromptLookup {
        PromptLookup::default()
    }

    /// Index every n-gram that ends before the last token of `tokens`.
    fn index(&mut self, tokens: &[u32]) {
        let unchanged = self.seen.len() <= tokens.len() && tokens.starts_with(&self.seen);
        if !unchanged {
            self.ends.iter_mut().for_each(Map::clear);
            self.indexed = 0;
        }
        self.seen.clear();
        self.seen.extend_from_slice(tokens);
        let last = tokens.len().saturating_sub(1);
        for end in self.indexed.max(MIN_NGRAM)..=last {
            for n in MIN_NGRAM..=MAX_NGRAM.min(end) {
                self.ends[n - MIN_NGRAM].insert(ngram_hash(&tokens[end - n..end]), end);
            }
        }
        self.indexed = self.indexed.max(last + 1);
    }
}

impl Drafter for PromptLookup {
    fn draft(&mut self, tokens: &[u32], max: usize, out: &mut Vec<u32>) {
        self.index(tokens);
        if self.pause > 0 {
            self.pause -= 1;
            return;
        }
        let max = LADDER[self.rung].min(max);
        let len = tokens.len();
        for n in (MIN_NGRAM..=MAX_NGRAM.min(len)).rev() {
            let suffix = &tokens[len - n..];
            let Some(&end) = self.ends[n - MIN_NGRAM].get(&ngram_hash(suffix)) else {
                continue;
            };
            if tokens[end - n..end] != *suffix {
                continue; // a hash collision
            }
            // The continuation after `end`; past the end of the tokens, the draft's own
            // tokens (the span from `end` to `len` repeated).
            for i in 0..max {
                let at = end + i;
                let t = if at < len { tokens[at] } else { out[at - len] };
                out.push(t);
            }
            return;
        }
    }

    fn verified(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        if accepted == drafted {
            self.rung = (self.rung + 1).min(LADDER.len() - 1);
        } else if accepted > 0 {
            self.backoff = 1;
        } else if self.rung > 0 {
            self.rung -= 1;
        } else {
            self.pause = self.backoff;
            self.backoff = (2 * self.backoff).min(MAX_PAUSE);
        }
        if accepted > 0 {
            self.backoff = 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(d: &mut PromptLookup, tokens: &[u32], max: usize) -> Vec<u32> {
        let mut out = Vec::new();
        d.draft(tokens, max, &mut out);
        out
    }

    #[test]
    fn continues_the_most_recent_match_of_the_longest_ngram() {
        let mut d = PromptLookup::new();
        // "5 6" occurs twice before the end; "4 5 6" once, followed by 7 8.
        let tokens = [1, 5, 6, 9, 4, 5, 6, 7, 8, 2, 5, 6, 3, 4, 5, 6];
        assert_eq!(draft(&mut d, &tokens, 3), [7, 8, 2]);
        // Only the 2-gram "5 6" matches: its most recent earlier occurrence is followed by 3.
        let tokens = [1, 5, 6, 9, 4, 5, 6, 7, 8, 2, 5, 6, 3, 0, 5, 6];
        assert_eq!(draft(&mut PromptLookup::new(), &tokens, 2), [3, 0]);
        // No n-gram of two tokens or more: no draft.
        assert!(draft(&mut PromptLookup::new(), &[1, 2, 3, 4, 1], 4).is_empty());
        assert!(draft(&mut PromptLookup::new(), &[], 4).is_empty());
        assert!(draft(&mut PromptLookup::new(), &[7], 4).is_empty());
    }

    #[test]
    fn a_loop_goes_on_past_the_end() {
        let mut d = PromptLookup {
            rung: LADDER.len() - 1,
            ..PromptLookup::new()
        };
        let tokens = [9, 1, 2, 3, 1, 2, 3];
        assert_eq!(draft(&mut d, &tokens, 7), [1, 2, 3, 1, 2, 3, 1]);
        // The same token repeated: a run.
        assert_eq!(draft(&mut PromptLookup::new(), &[4, 4, 4], 3), [4, 4, 4]);
    }

    #[test]
    fn follows_growing_tokens_and_starts_again_on_others() {
        let mut d = PromptLookup::new();
        let mut tokens = vec![1, 2, 3, 4, 5, 1, 2];
        assert_eq!(draft(&mut d, &tokens, 2), [3, 4]);
        tokens.extend([3, 9, 1, 2]);
        // "9 1 2" has no earlier match; "1 2" does, most recently at 5..7, followed by 3 9.
        assert_eq!(draft(&mut d, &tokens, 2), [3, 9]);
        // Another sequence altogether (not an extension): indexed from scratch.
        assert_eq!(draft(&mut d, &[8, 7, 6, 8, 7], 1), [6]);
        assert!(draft(&mut d, &[1, 2, 3], 1).is_empty());
    }

    #[test]
    fn draft_length_follows_verification() {
        let mut d = PromptLookup::new();
        let tokens: Vec<u32> = (1..=20).chain([1, 2]).collect();
        let len = |d: &mut PromptLookup, max| draft(d, &tokens, max).len();
        assert_eq!(len(&mut d, 16), 3);
        d.verified(3, 3);
        assert_eq!(len(&mut d, 16), 7);
        d.verified(7, 7);
        assert_eq!(len(&mut d, 16), 15);
        assert_eq!(len(&mut d, 8), 8, "the caller's max bounds it");
        d.verified(15, 15);
        assert_eq!(len(&mut d, 16), 15);
        d.verified(15, 4);
        assert_eq!(len(&mut d, 16), 15, "a partial draft keeps the length");
        d.verified(15, 0);
        d.verified(7, 0);
        assert_eq!(len(&mut d, 16), 3);
        d.verified(3, 0);
        assert_eq!(len(&mut d, 16), 1);
        // Single tokens missed: the next lookup is skipped, then two, then four …
        for pause in [1, 2, 4, 8, 16, 16] {
            d.verified(1, 0);
            for _ in 0..pause {
                assert_eq!(len(&mut d, 16), 0);
            }
            assert_eq!(len(&mut d, 16), 1);
        }
        // … until one is right: a miss then pauses one step again.
        d.verified(1, 1);
        d.verified(3, 0);
        d.verified(1, 0);
        assert_eq!(len(&mut d, 16), 0);
        assert_eq!(len(&mut d, 16), 1);
    }
}
