//! Tool calls and log-probabilities in the library, on the demo model (which was never taught
//! tools: the constraint, not the model, makes every call valid). Each call's arguments are
//! checked by an independent validator (the `jsonschema` crate) against its tool's schema.

mod common;

use phi4::chat::{Message, Role};
use phi4::sample::SamplingParams;
use phi4::session::{DoneReason, GenerateParams, Session, SessionParams};
use phi4::tools::{reply_text, CALL_OPEN};
use phi4::{Constraint, SessionError, Tool, ToolChoice, Tools};
use serde_json::{json, Value};

fn tool(name: &str, description: &str, parameters: Value) -> Tool {
    Tool::from_json(&json!({"type": "function", "function": {"name": name, "description": description, "parameters": parameters}})).unwrap()
}

fn weather_tools() -> Vec<Tool> {
    vec![
        tool(
            "get_weather",
            "The current weather in a city.",
            json!({"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]}
            }, "required": ["city", "unit"]}),
        ),
        tool(
            "add",
            "Add two integers.",
            json!({"type": "object", "properties": {
                "a": {"type": "integer"}, "b": {"type": "integer"}
            }, "required": ["a", "b"]}),
        ),
        tool(
            "list_files",
            "",
            json!({"type": "object", "properties": {
                "paths": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
                "recursive": {"type": "boolean"}
            }, "required": ["paths"]}),
        ),
    ]
}

fn params(tools: Tools, temperature: f32, seed: u64) -> GenerateParams {
    GenerateParams {
        sampling: SamplingParams {
            temperature,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        max_tokens: 300,
        tools: Some(tools),
        ..Default::default()
    }
}

/// Every call names a tool of `allowed` and its arguments are valid for that tool's schema.
fn assert_valid(calls: &[phi4::ToolCall], all: &[Tool], allowed: &[&str]) {
    for c in calls {
        assert!(allowed.contains(&c.name.as_str()), "{} called", c.name);
        let t = all.iter().find(|t| t.name == c.name).unwrap();
        let validator = jsonschema::validator_for(&t.parameters).unwrap();
        assert!(
            validator.is_valid(&c.arguments),
            "{}: {}",
            c.name,
            c.arguments
        );
    }
}

#[test]
fn every_call_is_valid_for_every_choice() {
    let model = common::demo();
    let mut s = Session::new(model, &SessionParams::default()).unwrap();
    let all = weather_tools();
    let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
    let prompts = [
        "What is the weather in Paris?",
        "Add 2 and 40.",
        "List the files in src and tests.",
        "How do I open a file in Python?",
    ];
    let draws: &[(f32, u64)] = if common::runner().is_some() {
        &[(0.0, 0)]
    } else {
        &[(0.0, 0), (1.0, 1), (1.5, 2)]
    };
    let (mut made, mut replies) = (0, 0);
    for choice in [
        ToolChoice::Required,
        ToolChoice::Auto,
        ToolChoice::Function("add".into()),
        ToolChoice::None,
    ] {
        for parallel in [false, true] {
            for prompt in prompts {
                for &(temperature, seed) in draws {
                    let tools = Tools {
                        tools: all.clone(),
                        choice: choice.clone(),
                        parallel,
                    };
                    let out = s
                        .chat(
                            &[Message::new(Role::User, prompt)],
                            &params(tools, temperature, seed),
                            &mut |_, _| true,
                        )
                        .unwrap();
                    replies += 1;
                    let ctx = format!("{choice:?} parallel {parallel} {prompt:?}: {out:?}");
                    match &choice {
                        ToolChoice::None => assert!(out.tool_calls.is_empty(), "{ctx}"),
                        ToolChoice::Function(f) => {
                            assert_valid(&out.tool_calls, &all, &[f.as_str()]);
                        }
                        _ => assert_valid(&out.tool_calls, &all, &names),
                    }
                    if matches!(choice, ToolChoice::Required | ToolChoice::Function(_))
                        && out.reason == DoneReason::Stop
                    {
                        assert!(!out.tool_calls.is_empty(), "{ctx}");
                        assert_eq!(out.text, "", "{ctx}");
                    }
                    if !parallel {
                        assert!(out.tool_calls.len() <= 1, "{ctx}");
                    }
                    assert!(!out.text.contains(CALL_OPEN), "{ctx}");
                    made += out.tool_calls.len();
                }
            }
        }
    }
    assert!(made >= replies / 2, "{made} calls in {replies} replies");
}

#[test]
fn a_conversation_goes_on_after_calls_from_the_cache() {
    let model = common::demo();
    let mut s = Session::new(model, &SessionParams::default()).unwrap();
    let tools = Tools {
        tools: weather_tools(),
        choice: ToolChoice::Required,
        parallel: true,
    };
    let gp = params(tools.clone(), 0.0, 0);
    let mut msgs = vec![
        Message::new(Role::System, "You help with the weather."),
        Message::new(Role::User, "What is the weather in Paris and in Oslo?"),
    ];
    let first = s.chat(&msgs, &gp, &mut |_, _| true).unwrap();
    assert_eq!(first.reason, DoneReason::Stop);
    assert!(!first.tool_calls.is_empty());
    // The reply as the model wrote it, then a result per call.
    msgs.push(Message::new(
        Role::Assistant,
        reply_text(&first.text, &first.tool_calls),
    ));
    for _ in &first.tool_calls {
        msgs.push(Message::new(Role::Tool, "{\"temperature\": 21}"));
    }
    let gp = GenerateParams {
        max_tokens: 20,
        ..params(
            Tools {
                choice: ToolChoice::None,
                ..tools
            },
            0.0,
            0,
        )
    };
    let second = s.chat(&msgs, &gp, &mut |_, _| true).unwrap();
    let t = second.timings;
    // Only the tool turns and the new reply's start were evaluated: the calls were in the cache.
    assert!(
        t.prompt_eval_count < 30 * first.tool_calls.len() + 10,
        "{} of {} prompt tokens evaluated",
        t.prompt_eval_count,
        t.prompt_tokens
    );
    assert!(second.tool_calls.is_empty());
}

#[test]
fn the_tools_are_described_in_the_system_message() {
    let tools = Tools {
        tools: weather_tools(),
        ..Default::default()
    };
    let msgs = tools.describe(&[Message::new(Role::User, "hi")]);
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].role, Role::System);
    for t in &tools.tools {
        assert!(msgs[0]
            .content
            .contains(&format!("{{\"name\": \"{}\"", t.name)));
    }
    let msgs = tools.describe(&[
        Message::new(Role::System, "Be brief."),
        Message::new(Role::User, "hi"),
    ]);
    assert_eq!(msgs.len(), 2);
    assert!(msgs[0].content.starts_with("Be brief.\n\n# Tools"));
}

#[test]
fn bad_tools_are_refused_before_any_work() {
    let model = common::demo();
    let mut s = Session::new(model, &SessionParams::default()).unwrap();
    let bad = |v: Value| Tool::from_json(&v).unwrap_err();
    assert!(bad(json!({"function": {"description": "no name"}})).contains("no name"));
    assert!(bad(json!({"function": {"name": "a b"}})).contains("must be"));
    assert!(
        bad(json!({"function": {"name": "f", "parameters": {"type": "string"}}}))
            .contains("object")
    );
    assert!(bad(json!({"function": {"name": "f", "parameters": [1]}})).contains("JSON Schema"));
    assert!(bad(json!({"type": "retrieval", "function": {"name": "f"}})).contains("not supported"));
    let msgs = [Message::new(Role::User, "hi")];
    let run = |s: &mut Session, gp: &GenerateParams| s.chat(&msgs, gp, &mut |_, _| true);
    let named = Tools {
        tools: weather_tools(),
        choice: ToolChoice::Function("nope".into()),
        parallel: false,
    };
    assert!(
        matches!(run(&mut s, &params(named, 0.0, 0)), Err(SessionError::BadParams(m)) if m.contains("nope"))
    );
    let twice = Tools {
        tools: vec![weather_tools()[0].clone(), weather_tools()[0].clone()],
        ..Default::default()
    };
    assert!(
        matches!(run(&mut s, &params(twice, 0.0, 0)), Err(SessionError::BadParams(m)) if m.contains("twice"))
    );
    let with_format = GenerateParams {
        constraint: Some(Constraint::Json),
        ..params(
            Tools {
                tools: weather_tools(),
                ..Default::default()
            },
            0.0,
            0,
        )
    };
    assert!(
        matches!(run(&mut s, &with_format), Err(SessionError::BadParams(m)) if m.contains("format"))
    );
    // A schema llguidance cannot compile (a $ref to nowhere).
    let broken = Tools {
        tools: vec![tool(
            "f",
            "",
            json!({"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}),
        )],
        choice: ToolChoice::Required,
        parallel: false,
    };
    assert!(
        matches!(run(&mut s, &params(broken, 0.0, 0)), Err(SessionError::Constraint(m)) if m.contains("tools")),
    );
    // Raw prompts take no tools.
    let gp = params(
        Tools {
            tools: weather_tools(),
            ..Default::default()
        },
        0.0,
        0,
    );
    assert!(matches!(
        s.generate(&[1, 2, 3], &gp, &mut |_, _| true),
        Err(SessionError::BadParams(_))
    ));
    // The session still works.
    let out = run(
        &mut s,
        &GenerateParams {
            max_tokens: 4,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(out.timings.eval_count, 4);
}

#[test]
fn logprobs_are_the_log_softmax_of_the_logits() {
    let model = common::demo();
    let mut s = Session::new(model.clone(), &SessionParams::default()).unwrap();
    let prompt = model.tokenizer.encode("A list in Python is", false);
    // The first token's scores, from the logits themselves.
    let logits = s.evaluate(&prompt).unwrap().to_vec();
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let lse = max
        + logits
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    s.reset();
    let gp = GenerateParams {
        sampling: SamplingParams::greedy(),
        max_tokens: 12,
        logprobs: Some(5),
        ..Default::default()
    };
    let mut tokens = Vec::new();
    s.generate(&prompt, &gp, &mut |t, _| {
        tokens.extend(t.cloned());
        true
    })
    .unwrap();
    assert_eq!(tokens.len(), 12);
    let first = tokens[0].logprob.as_ref().unwrap();
    assert!((first.logprob - (logits[tokens[0].id as usize] - lse)).abs() < 1e-4);
    for t in &tokens {
        let lp = t.logprob.as_ref().unwrap();
        assert_eq!(lp.top.len(), 5);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(lp.top[0].0, t.id);
        assert_eq!(lp.top[0].1, lp.logprob);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let mass: f64 = lp.top.iter().map(|&(_, p)| (p as f64).exp()).sum();
        assert!(lp.logprob <= 0.0 && mass <= 1.0 + 1e-5, "{lp:?}");
    }
    // Sampled with a penalty: the reported probability is still the model's, not the sampler's.
    let gp = GenerateParams {
        sampling: SamplingParams {
            temperature: 2.0,
            seed: Some(3),
            repeat_penalty: 1.5,
            ..SamplingParams::default()
        },
        max_tokens: 1,
        logprobs: Some(0),
        ..Default::default()
    };
    s.reset();
    let mut got = None;
    s.generate(&prompt, &gp, &mut |t, _| {
        got = t.cloned().or(got.take());
        true
    })
    .unwrap();
    let got = got.unwrap();
    let lp = got.logprob.unwrap();
    assert!(lp.top.is_empty());
    assert!((lp.logprob - (logits[got.id as usize] - lse)).abs() < 1e-4);
    let too_many = GenerateParams {
        logprobs: Some(21),
        ..Default::default()
    };
    assert!(matches!(
        s.generate(&prompt, &too_many, &mut |_, _| true),
        Err(SessionError::BadParams(_))
    ));
}
