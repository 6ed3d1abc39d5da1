//! Constrained decoding: JSON Schemas, JSON mode, regexes and Lark grammars on the demo model and
//! on a synthetic model with Phi-4's real 100,352-token vocabulary (random weights: the mask,
//! not the model, keeps its replies valid). Every reply is checked by an independent validator:
//! the `jsonschema` crate, the `regex` crate, a hand-written parser for the grammar.

mod common;

use std::sync::Arc;

use phi4::chat::{Message, Role};
use phi4::model::{LoadParams, Model};
use phi4::sample::SamplingParams;
use phi4::session::{DoneReason, GenerateParams, Outcome, Session, SessionParams};
use phi4::Constraint;
use phi4::SessionError;
use phi4_synth::{Spec, Vocab};
use serde_json::{json, Value};

/// Two small layers over Phi-4's own vocabulary (kept in memory; the file is removed).
fn real_vocab() -> Arc<Model> {
    let dir = common::tmpdir();
    let spec = Spec {
        vocab: Vocab::From(common::fixture("phi4-vocab.gguf")),
        ..Spec::small(2, common::ftype("q8_0"), 7)
    };
    let path = common::synth_model(dir.path(), "vocab.gguf", &spec);
    Arc::new(Model::load(&path, LoadParams::default()).unwrap())
}

/// The models a test runs on: under an emulator (ports/qemu-test) the demo model only — the
/// constraint engine is the same code on every CPU, and the native run covers Phi-4's
/// vocabulary.
fn models() -> Vec<(&'static str, Arc<Model>)> {
    let mut v = vec![("demo", common::demo())];
    if common::runner().is_none() {
        v.push(("phi4 vocabulary", real_vocab()));
    }
    v
}

/// Temperatures and seeds: fewer under an emulator.
fn draws(all: &[(f32, u64)]) -> Vec<(f32, u64)> {
    let n = if common::runner().is_some() {
        2
    } else {
        all.len()
    };
    all[..n].to_vec()
}

fn session(m: &Arc<Model>) -> Session {
    Session::new(
        m.clone(),
        &SessionParams {
            n_ctx: 1024,
            n_batch: 64,
            n_threads: 2,
            ..Default::default()
        },
    )
    .unwrap()
}

fn params(c: Constraint, temperature: f32, seed: u64, max_tokens: usize) -> GenerateParams {
    let sampling = SamplingParams {
        temperature,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    GenerateParams {
        sampling,
        max_tokens,
        constraint: Some(c),
        ..Default::default()
    }
}

/// A chat turn; the streamed pieces joined must be the outcome's text.
fn ask(s: &mut Session, prompt: &str, gp: &GenerateParams) -> Result<Outcome, SessionError> {
    let mut streamed = String::new();
    let out = s.chat(&[Message::new(Role::User, prompt)], gp, &mut |_, piece| {
        streamed.push_str(piece);
        true
    })?;
    assert_eq!(out.text, streamed);
    Ok(out)
}

/// The corpus: each schema's strings, numbers and arrays bounded, so that even a model with
/// random weights finishes its reply well within the token budget.
fn schemas() -> Vec<Value> {
    vec![
        json!({ "type": "object", "properties": {
                    "state": { "enum": ["ok", "warning", "failed"] },
                    "alarm": { "type": "boolean" } },
                "required": ["state", "alarm"], "additionalProperties": false }),
        json!({ "type": "object", "properties": {
                    "sensor": { "type": "object", "properties": {
                        "id": { "type": "string", "pattern": "^[a-z]{2}-[0-9]{1,3}$" },
                        "celsius": { "type": "integer", "minimum": -40, "maximum": 125 } },
                      "required": ["id", "celsius"], "additionalProperties": false },
                    "readings": { "type": "array", "items": { "type": "integer", "minimum": 0, "maximum": 99 }, "minItems": 2, "maxItems": 4 } },
                "required": ["sensor", "readings"], "additionalProperties": false }),
        json!({ "type": "array", "items": { "type": "object", "properties": {
                    "name": { "type": "string", "maxLength": 12 },
                    "tags": { "type": "array", "items": { "enum": ["a", "b", "c"] }, "maxItems": 3 } },
                  "required": ["name"], "additionalProperties": false },
                "minItems": 1, "maxItems": 3 }),
        // Pydantic's shape: $defs and $ref, titles, an optional field.
        json!({ "$defs": { "Point": { "type": "object", "title": "Point", "properties": {
                    "x": { "type": "integer", "minimum": 0, "maximum": 9 }, "y": { "type": "integer", "minimum": 0, "maximum": 9 } },
                  "required": ["x", "y"], "additionalProperties": false } },
                "title": "Path", "type": "object",
                "properties": { "points": { "type": "array", "items": { "$ref": "#/$defs/Point" }, "minItems": 1, "maxItems": 3 },
                                "closed": { "type": "boolean" } },
                "required": ["points"], "additionalProperties": false }),
    ]
}

/// Every schema, at several temperatures and seeds, on both models: the reply ends by itself,
/// parses and validates.
#[test]
fn replies_validate_against_their_schema() {
    for (name, m) in models() {
        let mut s = session(&m);
        for schema in schemas() {
            let validator = jsonschema::validator_for(&schema).unwrap();
            for (temperature, seed) in draws(&[(0.0, 0), (1.0, 2), (0.7, 1), (1.5, 3)]) {
                let gp = params(
                    Constraint::JsonSchema(schema.to_string()),
                    temperature,
                    seed,
                    400,
                );
                let out = ask(&mut s, "Report the sensor state as JSON.", &gp).unwrap();
                assert_eq!(
                    out.reason,
                    DoneReason::Stop,
                    "{name}, t={temperature}: {:?}",
                    out.text
                );
                let v: Value = serde_json::from_str(&out.text)
                    .unwrap_or_else(|e| panic!("{name}, t={temperature}: {e}: {:?}", out.text));
                assert!(
                    validator.is_valid(&v),
                    "{name}, t={temperature}, {schema}: {v}"
                );
                eprintln!("{name}, t={temperature}: {v}");
            }
        }
    }
}

#[test]
fn json_mode_gives_an_object() {
    let m = common::demo();
    let mut s = session(&m);
    for (temperature, seed) in [(0.0, 0), (0.8, 5)] {
        let out = ask(
            &mut s,
            "Describe a Python list as JSON.",
            &params(Constraint::Json, temperature, seed, 300),
        )
        .unwrap();
        if out.reason == DoneReason::Stop {
            let v: Value =
                serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("{e}: {:?}", out.text));
            assert!(v.is_object(), "{v}");
        } else {
            // Cut at max_tokens: a prefix of an object.
            assert_eq!(out.reason, DoneReason::Length);
            assert!(out.text.starts_with('{'), "{:?}", out.text);
        }
    }
}

#[test]
fn regex_replies_match() {
    let rx = r"[0-9]{3}-[0-9]{4} (yes|no)";
    let check = regex::Regex::new(&format!("^(?:{rx})$")).unwrap();
    for (_, m) in models() {
        let mut s = session(&m);
        for (temperature, seed) in draws(&[(0.0, 0), (1.0, 1), (1.5, 2)]) {
            let out = ask(
                &mut s,
                "A phone number?",
                &params(Constraint::Regex(rx.into()), temperature, seed, 100),
            )
            .unwrap();
            assert_eq!(out.reason, DoneReason::Stop);
            assert!(check.is_match(&out.text), "{:?}", out.text);
        }
    }
}

/// Sums and products of small numbers in parentheses: context-free, not regular.
const ARITHMETIC: &str = r#"
start: expr
expr: term (("+" | "-") term)*
term: factor ("*" factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"#;

/// An independent recognizer of ARITHMETIC's language.
fn arithmetic(s: &str) -> bool {
    fn expr(b: &[u8], i: &mut usize, depth: usize) -> bool {
        term(b, i, depth) && {
            while *i < b.len() && (b[*i] == b'+' || b[*i] == b'-') {
                *i += 1;
                if !term(b, i, depth) {
                    return false;
                }
            }
            true
        }
    }
    fn term(b: &[u8], i: &mut usize, depth: usize) -> bool {
        factor(b, i, depth) && {
            while *i < b.len() && b[*i] == b'*' {
                *i += 1;
                if !factor(b, i, depth) {
                    return false;
                }
            }
            true
        }
    }
    fn factor(b: &[u8], i: &mut usize, depth: usize) -> bool {
        if *i < b.len() && b[*i] == b'(' {
            *i += 1;
            return depth < 100 && expr(b, i, depth + 1) && *i < b.len() && b[*i] == b')' && {
                *i += 1;
                true
            };
        }
        let digits = b[*i..].iter().take_while(|c| c.is_ascii_digit()).count();
        *i += digits;
        (1..=3).contains(&digits)
    }
    let mut i = 0;
    expr(s.as_bytes(), &mut i, 0) && i == s.len()
}

#[test]
fn grammar_replies_parse() {
    assert!(arithmetic("(1+2)*30-4") && !arithmetic("(1+2") && !arithmetic("1234"));
    for (_, m) in models() {
        let mut s = session(&m);
        let mut finished = 0;
        for (temperature, seed) in [(0.0, 0), (0.8, 1), (1.0, 2), (1.2, 3)] {
            let out = ask(
                &mut s,
                "Write a sum.",
                &params(Constraint::Lark(ARITHMETIC.into()), temperature, seed, 60),
            )
            .unwrap();
            // The grammar allows endless sums, so the reply ends when the model ends it (or at
            // max_tokens, as a prefix of a valid one).
            if out.reason == DoneReason::Stop {
                finished += 1;
                assert!(arithmetic(&out.text), "{:?}", out.text);
            } else {
                assert_eq!(out.reason, DoneReason::Length);
                assert!(
                    out.text
                        .bytes()
                        .all(|c| c.is_ascii_digit() || b"+-*()".contains(&c)),
                    "{:?}",
                    out.text
                );
            }
        }
        assert!(finished > 0, "no reply ended by itself");
    }
}

/// Strings of multi-byte characters, which Phi-4's vocabulary often splits across tokens:
/// the streamed text is valid UTF-8 at every step (the pieces are `&str`) and the reply parses.
#[test]
fn unicode_in_json_strings_stays_valid() {
    let m = real_vocab();
    let mut s = session(&m);
    let schema = json!({ "type": "object", "properties": {
        "word": { "type": "string", "pattern": "^[äöüß€日本語🎉]{3,8}$" },
        "greeting": { "enum": ["grüß dich", "こんにちは", "👋 hi"] } },
        "required": ["word", "greeting"], "additionalProperties": false });
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut split = 0;
    for (temperature, seed) in draws(&[(1.0, 1), (2.0, 3), (0.0, 0), (1.5, 2)]) {
        let gp = params(
            Constraint::JsonSchema(schema.to_string()),
            temperature,
            seed,
            200,
        );
        let mut pieces = Vec::new();
        let out = s
            .chat(
                &[Message::new(Role::User, "Say hello.")],
                &gp,
                &mut |id, piece| {
                    pieces.push((id.map(|t| t.id), piece.to_string()));
                    true
                },
            )
            .unwrap();
        assert_eq!(out.reason, DoneReason::Stop, "{:?}", out.text);
        let v: Value = serde_json::from_str(&out.text).unwrap();
        assert!(validator.is_valid(&v), "{v}");
        // A token that ends inside a character streams nothing; the next one brings it whole.
        split += pieces
            .iter()
            .filter(|(id, p)| id.is_some() && p.is_empty())
            .count();
    }
    assert!(
        split > 0,
        "no character was split across tokens: the test did not test that"
    );
}

#[test]
fn a_bad_constraint_is_an_error_before_any_work() {
    let m = common::demo();
    let mut s = session(&m);
    let ok = GenerateParams {
        sampling: SamplingParams::greedy(),
        max_tokens: 8,
        ..Default::default()
    };
    ask(&mut s, "What is a list?", &ok).unwrap();
    let before = s.history().to_vec();
    let bad = [
        (Constraint::JsonSchema("{\"type\": ".into()), "not JSON"),
        (
            Constraint::JsonSchema(
                json!({ "type": "integer", "minimum": 5, "maximum": 1 }).to_string(),
            ),
            "JSON schema",
        ),
        (Constraint::JsonSchema("[1, 2]".into()), "must be an object"),
        (Constraint::Regex("(unclosed".into()), "regex"),
        (
            Constraint::Lark("start: undefined_rule".into()),
            "undefined_rule",
        ),
        (Constraint::Lark("this is not lark".into()), "grammar"),
    ];
    for (c, says) in bad {
        let err = ask(&mut s, "Another question?", &params(c.clone(), 0.0, 0, 8)).unwrap_err();
        assert!(matches!(err, SessionError::Constraint(_)), "{c:?}: {err:?}");
        assert!(err.to_string().contains(says), "{c:?}: {err}");
        assert_eq!(s.history(), before, "the session is untouched");
    }
    // And the session goes on, constrained or not.
    let out = ask(
        &mut s,
        "What is a list?",
        &params(Constraint::Regex("(yes|no)".into()), 0.0, 0, 8),
    )
    .unwrap();
    assert!(out.text == "yes" || out.text == "no", "{:?}", out.text);
    ask(&mut s, "What is a list?", &ok).unwrap();
}

/// Where a schema leaves keys and integers open, it is read as Ollama (llama.cpp) reads it: no
/// keys beyond `properties` unless allowed, integers of at most 16 digits — so that even a model
/// with random weights ends its reply.
#[test]
fn open_schemas_are_read_as_ollama_reads_them() {
    let m = real_vocab();
    let mut s = session(&m);
    let schema = json!({ "type": "object", "properties": { "n": { "type": "integer" }, "items": { "type": "array", "items": { "type": "object", "properties": { "k": { "type": "boolean" } } }, "maxItems": 2 } }, "required": ["n", "items"] });
    for seed in 0..4 {
        let out = ask(
            &mut s,
            "Numbers.",
            &params(Constraint::JsonSchema(schema.to_string()), 1.0, seed, 300),
        )
        .unwrap();
        assert_eq!(out.reason, DoneReason::Stop, "{:?}", out.text);
        let v: Value = serde_json::from_str(&out.text).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["n", "items"], "{v}");
        assert!(
            v["n"].as_i64().is_some_and(|n| n.unsigned_abs() < 1 << 53),
            "{v}"
        );
        assert!(
            v["items"].as_array().unwrap().iter().all(|i| i
                .as_object()
                .unwrap()
                .keys()
                .all(|k| k == "k")),
            "{v}"
        );
    }
    // Keys a schema allows by pattern stay allowed.
    let open = json!({ "type": "object", "properties": { "a": { "type": "boolean" } }, "patternProperties": { "^x[0-9]$": { "type": "integer", "minimum": 0, "maximum": 9 } }, "required": ["a"] });
    let validator = jsonschema::validator_for(&open).unwrap();
    let extra = (0..6).any(|seed| {
        let out = ask(
            &mut s,
            "More.",
            &params(Constraint::JsonSchema(open.to_string()), 1.0, seed, 300),
        )
        .unwrap();
        let v: Value =
            serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("{e}: {:?}", out.text));
        assert!(validator.is_valid(&v), "{v}");
        v.as_object().unwrap().len() > 1
    });
    assert!(extra, "additionalProperties allowed no extra key");
}

/// At max_tokens the reply is cut (`length`), valid as far as it goes.
#[test]
fn max_tokens_cuts_a_valid_prefix() {
    let m = common::demo();
    let mut s = session(&m);
    let schema = json!({ "type": "object", "properties": { "items": { "type": "array", "items": { "type": "integer" }, "minItems": 20 } }, "required": ["items"] });
    let out = ask(
        &mut s,
        "Count.",
        &params(Constraint::JsonSchema(schema.to_string()), 0.0, 0, 16),
    )
    .unwrap();
    assert_eq!(
        (out.reason, out.timings.eval_count),
        (DoneReason::Length, 16)
    );
    let (t, head) = (out.text.as_str(), "{\"items\": [");
    let valid = head.starts_with(t)
        || t.strip_prefix(head).is_some_and(|rest| {
            rest.chars()
                .all(|c| c.is_ascii_digit() || ", -".contains(c))
        });
    assert!(valid, "{t:?}");
    eprintln!("cut after 16 tokens: {t:?}");
}
