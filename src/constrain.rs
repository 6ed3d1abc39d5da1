//! Constrained decoding: before every sample, the tokens that would break the reply's format
//! (JSON, a JSON Schema, a regex, a Lark grammar) are masked out, so the reply always parses.
//!
//! The engine is llguidance (lazy Earley parsing over a derivative-based regex lexer; the mask
//! of a 100K vocabulary in tens of microseconds, nothing precomputed per schema). It reads
//! phi4's own vocabulary: the token bytes of the GGUF, control tokens marked special (never
//! allowed inside the text), and phi4's BPE for its tokenization.
//!
//! A model builds the token trie once, on the first constrained generation; each generation
//! compiles its constraint ([`Compiler::compile`], an error before any work) into a [`Guide`]
//! that masks logits and follows the tokens chosen.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;

use crate::tokenizer::{TokenType, Tokenizer};

/// What a reply must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// Any JSON object (Ollama's `format: "json"`, OpenAI's `json_object`).
    Json,
    /// A JSON value valid against this JSON Schema (the schema's text).
    JsonSchema(String),
    /// Text matched, whole, by this regular expression.
    Regex(String),
    /// Text in the language of this Lark grammar (llguidance's dialect: `start: ...`).
    Lark(String),
}

impl Constraint {
    /// The name of its kind, as errors and the CLI say it.
    pub fn kind(&self) -> &'static str {
        match self {
            Constraint::Json => "json",
            Constraint::JsonSchema(_) => "JSON schema",
            Constraint::Regex(_) => "regex",
            Constraint::Lark(_) => "grammar",
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Constraint::Json => {
                TopLevelGrammar::from_json_schema(json_schema(r#"{"type": "object"}"#)?)
            }
            Constraint::JsonSchema(text) => TopLevelGrammar::from_json_schema(json_schema(text)?),
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        })
    }
}

/// A schema's text as JSON, read as Ollama (llama.cpp) reads it, with phi4's layout for the
/// output unless the schema sets its own (`x-guidance`): `{"a": 1, "b": [2, 3]}` — the spacing
/// models write, and no room for the runs of whitespace a free layout lets a small model loop in.
pub(crate) fn json_schema(text: &str) -> Result<Value, String> {
    let mut schema: Value =
        serde_json::from_str(text).map_err(|e| format!("the JSON schema is not JSON: {e}"))?;
    tighten(&mut schema);
    if let Some(obj) = schema.as_object_mut() {
        if !obj.contains_key("x-guidance") {
            let layout = JsonCompileOptions {
                item_separator: ", ".into(),
                key_separator: ": ".into(),
                whitespace_flexible: false,
                ..Default::default()
            };
            obj.insert(
                "x-guidance".into(),
                serde_json::to_value(layout).map_err(|e| e.to_string())?,
            );
        }
    } else if !schema.is_boolean() {
        return Err("the JSON schema must be an object (or true / false)".into());
    }
    Ok(schema)
}

/// Where a schema leaves them open, the limits Ollama's (llama.cpp's) schema conversion sets,
/// so that a reply cannot run on without end: an object with `properties` (or
/// `patternProperties`) has no other keys unless `additionalProperties` allows them, and an
/// integer has at most 16 digits (within JSON's safe integers, ±(2^53 - 1)).
fn tighten(schema: &mut Value) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    if (obj.contains_key("properties") || obj.contains_key("patternProperties"))
        && !obj.contains_key("additionalProperties")
    {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
    if obj.get("type").and_then(Value::as_str) == Some("integer") {
        const SAFE: i64 = (1 << 53) - 1;
        for (key, limit) in [("minimum", -SAFE), ("maximum", SAFE)] {
            obj.entry(key).or_insert(Value::from(limit));
        }
    }
    // Every place a subschema can be.
    for (key, sub) in obj.iter_mut() {
        match (key.as_str(), sub) {
            (
                "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas",
                Value::Object(m),
            ) => m.values_mut().for_each(tighten),
            ("anyOf" | "oneOf" | "allOf" | "prefixItems" | "items", Value::Array(a)) => {
                a.iter_mut().for_each(tighten)
            }
            (
                "items"
                | "additionalProperties"
                | "not"
                | "if"
                | "then"
                | "else"
                | "contains"
                | "additionalItems"
                | "propertyNames",
                s,
            ) => tighten(s),
            _ => {}
        }
    }
}

/// phi4's vocabulary as llguidance sees it.
struct Vocab {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.tokenizer.encode_bytes(s)
    }
}

/// Compiles constraints for one model's vocabulary. The token trie is built on first use and
/// shared by every session of the model.
#[derive(Default)]
pub(crate) struct Compiler(OnceLock<Result<ParserFactory, String>>);

impl Compiler {
    fn factory(&self, tokenizer: &Arc<Tokenizer>) -> Result<&ParserFactory, String> {
        self.0
            .get_or_init(|| build_factory(tokenizer))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The guide of one generation, or why the constraint does not compile.
    pub(crate) fn compile(
        &self,
        tokenizer: &Arc<Tokenizer>,
        c: &Constraint,
    ) -> Result<Guide, String> {
        let factory = self.factory(tokenizer)?;
        let grammar = c.grammar()?;
        // llguidance reports bad grammars as errors; a panic inside it is one too.
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            factory.create_parser(grammar)
        }))
        .map_err(|_| format!("the {} could not be compiled", c.kind()))?
        .map_err(|e| {
            format!(
                "the {} does not compile: {}",
                c.kind(),
                one_line(&e.to_string())
            )
        })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(format!(
                "the {} does not compile: {}",
                c.kind(),
                one_line(&e)
            ));
        }
        Ok(Guide { matcher })
    }
}

/// llguidance's multi-line error (with a caret under the spot) as one line.
fn one_line(e: &str) -> String {
    let context = |l: &&str| {
        l.chars().all(|c| c == '^' || c == ' ')
            || l.split_once(" | ")
                .is_some_and(|(n, _)| n.trim().parse::<u32>().is_ok())
    };
    e.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| !context(l))
        .collect::<Vec<_>>()
        .join(" ")
}

fn build_factory(tokenizer: &Arc<Tokenizer>) -> Result<ParserFactory, String> {
    let n = tokenizer.n_vocab();
    let ends = &tokenizer.end_of_generation;
    let &eos = ends.first().ok_or(
        "the vocabulary has no end-of-text token, which a constraint needs to end the reply",
    )?;
    // Control and placeholder tokens are special: their text behind llguidance's marker byte.
    let words: Vec<Vec<u8>> = (0..n as u32)
        .map(|id| match tokenizer.token_type(id) {
            Some(TokenType::Normal | TokenType::Byte) => tokenizer.piece(id, false).to_vec(),
            _ => [
                &[TokTrie::SPECIAL_TOKEN_MARKER][..],
                tokenizer.piece(id, true),
            ]
            .concat(),
        })
        .collect();
    // The reply may end (when the constraint is complete) with any of the model's end tokens.
    let trie = TokTrie::from(&TokRxInfo::new(n as u32, eos), &words).with_eos_tokens(ends);
    let env = Arc::new(Vocab {
        trie,
        tokenizer: tokenizer.clone(),
    });
    let mut factory = ParserFactory::new_simple(&(env as llguidance::toktrie::TokEnv))
        .map_err(|e| e.to_string())?;
    factory.quiet();
    Ok(factory)
}

/// A constraint following one generation.
pub(crate) struct Guide {
    matcher: Matcher,
}

impl Guide {
    /// Give every token the constraint does not allow next a logit of -inf. Fails when no
    /// token is allowed (the constraint is broken or exhausted its limits).
    pub(crate) fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self
            .matcher
            .compute_mask()
            .map_err(|e| format!("the constraint failed: {e}"))?;
        if allowed.is_zero() {
            return Err("the constraint allows no token here".into());
        }
        // (The mask has one bit per vocabulary entry: as many as the logits.)
        allowed.iter_unset_entries(|id| logits[id] = f32::NEG_INFINITY);
        Ok(())
    }

    /// Follow the token chosen (from the mask: always allowed).
    pub(crate) fn accept(&mut self, id: u32) -> Result<(), String> {
        self.matcher
            .consume_token(id)
            .map_err(|e| format!("the constraint failed: {e}"))
    }

    /// How many of `tokens`, in order, the constraint would accept next (none is followed).
    pub(crate) fn valid_prefix(&mut self, tokens: &[u32]) -> usize {
        self.matcher.validate_tokens(tokens).unwrap_or(0)
    }

    /// The reply is complete and nothing may follow it.
    pub(crate) fn finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
