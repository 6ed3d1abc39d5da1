//! Sessions on the demo model (Phi-4's architecture, trained on the Python docs): prefix reuse,
//! rewinding, context overflow, stopping, cancelling.

mod common;

use std::sync::Arc;

use phi4::chat::{self, Markers, Message, Role};
use phi4::model::Model;
use phi4::sample::SamplingParams;
use phi4::session::{DoneReason, GenerateParams, Overflow, Session, SessionParams};
use phi4::SessionError;

fn session(model: &Arc<Model>, n_ctx: usize, overflow: Overflow) -> Session {
    Session::new(
        model.clone(),
        &SessionParams {
            n_ctx,
            n_batch: 32,
            n_threads: 2,
            overflow,
            ..Default::default()
        },
    )
    .unwrap()
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        sampling: SamplingParams::greedy(),
        max_tokens,
        ..Default::default()
    }
}

fn collect(
    s: &mut Session,
    msgs: &[Message],
    gp: &GenerateParams,
) -> (phi4::session::Outcome, String) {
    let mut text = String::new();
    let out = s
        .chat(msgs, gp, &mut |_, p| {
            text.push_str(p);
            true
        })
        .unwrap();
    (out, text)
}

#[test]
fn replies_in_english_and_stops_at_im_end() {
    let m = common::demo();
    let mut s = session(&m, 1024, Overflow::Error);
    let msgs = [Message::new(Role::User, "How do I open a file in Python?")];
    let (out, text) = collect(&mut s, &msgs, &greedy(300));
    assert_eq!(out.reason, DoneReason::Stop, "{text:?}");
    assert_eq!(out.text, text);
    let words = text.split_whitespace().count();
    assert!(words >= 5, "{text:?}");
    // Mostly ASCII letters and spaces: real (if simple) English, not noise.
    let letters = text
        .chars()
        .filter(|c| c.is_ascii_alphabetic() || *c == ' ')
        .count();
    assert!(letters * 10 >= text.chars().count() * 7, "{text:?}");
    assert!(
        !text.contains("<|"),
        "control tokens are never printed: {text:?}"
    );
}

#[test]
fn second_turn_evaluates_only_its_new_tokens() {
    let m = common::demo();
    let markers = Markers::of(&m.tokenizer).unwrap();
    let mut s = session(&m, 2048, Overflow::Error);
    let mut msgs = vec![
        Message::new(Role::System, "You answer questions about Python."),
        Message::new(Role::User, "What is a list?"),
    ];
    let (first, reply) = collect(&mut s, &msgs, &greedy(200));
    assert_eq!(
        first.timings.prompt_eval_count,
        chat::tokens(&m.tokenizer, markers, &msgs, true).len()
    );
    let cached = s.history().len();
    msgs.push(Message::new(Role::Assistant, reply));
    msgs.push(Message::new(Role::User, "And a tuple?"));
    let (second, _) = collect(&mut s, &msgs, &greedy(20));
    let all = chat::tokens(&m.tokenizer, markers, &msgs, true);
    assert_eq!(
        &all[..cached],
        &s.history()[..cached],
        "the first turn is reused as it is in the cache"
    );
    assert_eq!(second.timings.prompt_eval_count, all.len() - cached);
    assert!(
        second.timings.prompt_eval_count < 20,
        "{}",
        second.timings.prompt_eval_count
    );
}

#[test]
fn edited_history_rewinds_to_the_common_prefix() {
    let m = common::demo();
    let markers = Markers::of(&m.tokenizer).unwrap();
    let mut s = session(&m, 2048, Overflow::Error);
    let a = vec![Message::new(Role::User, "Explain the for statement.")];
    collect(&mut s, &a, &greedy(10));
    let b = vec![Message::new(Role::User, "Explain the while statement.")];
    let (out, _) = collect(&mut s, &b, &greedy(10));
    let ta = chat::tokens(&m.tokenizer, markers, &a, true);
    let tb = chat::tokens(&m.tokenizer, markers, &b, true);
    let common = ta.iter().zip(&tb).take_while(|(x, y)| x == y).count();
    assert!(common > 2 && common < tb.len());
    assert_eq!(out.timings.prompt_eval_count, tb.len() - common);

    // The same result as a fresh session (the rewound cache holds no stale entries).
    let (fresh, _) = collect(&mut session(&m, 2048, Overflow::Error), &b, &greedy(10));
    let (again, _) = collect(&mut s, &b, &greedy(10));
    assert_eq!(fresh.text, again.text);
}

#[test]
fn overflow_is_an_error_before_any_work() {
    let m = common::demo();
    let mut s = session(&m, 64, Overflow::Error);
    collect(&mut s, &[Message::new(Role::User, "Hi")], &greedy(3));
    let before = s.history().to_vec();
    let long = "word ".repeat(200);
    let mut called = false;
    let e = s.chat(
        &[Message::new(Role::User, long)],
        &greedy(5),
        &mut |_, _| {
            called = true;
            true
        },
    );
    match e {
        Err(SessionError::ContextOverflow { needed, n_ctx }) => assert!(needed > 64 && n_ctx == 64),
        other => panic!("{other:?}"),
    }
    assert!(!called);
    assert_eq!(s.history(), before.as_slice());
}

#[test]
fn drop_oldest_keeps_the_system_message_and_reports() {
    let m = common::demo();
    let mut s = session(&m, 128, Overflow::DropOldest);
    let mut msgs = vec![Message::new(Role::System, "Be brief.")];
    for i in 0..6 {
        msgs.push(Message::new(
            Role::User,
            format!("Question number {i} about modules and packages?"),
        ));
        msgs.push(Message::new(
            Role::Assistant,
            "Modules are files and packages are directories of them.",
        ));
    }
    msgs.push(Message::new(Role::User, "And imports?"));
    let (out, _) = collect(&mut s, &msgs, &greedy(8));
    assert!(out.dropped_messages > 0);
    let markers = Markers::of(&m.tokenizer).unwrap();
    let kept: Vec<Message> = std::iter::once(msgs[0].clone())
        .chain(msgs[1 + out.dropped_messages..].iter().cloned())
        .collect();
    let kept_tokens = chat::tokens(&m.tokenizer, markers, &kept, true);
    assert!(kept_tokens.len() < 128);
    assert_eq!(
        &s.history()[..kept_tokens.len()],
        kept_tokens.as_slice(),
        "system message first, then the newest turns"
    );
}

#[test]
fn max_tokens_context_full_and_cancel() {
    let m = common::demo();
    let msgs = [Message::new(
        Role::User,
        "Describe the standard library in detail.",
    )];
    let mut s = session(&m, 1024, Overflow::Error);
    let (out, _) = collect(
        &mut s,
        &msgs,
        &GenerateParams {
            max_tokens: 5,
            ..greedy(5)
        },
    );
    assert_eq!(
        (out.reason, out.timings.eval_count),
        (DoneReason::Length, 5)
    );

    let prompt_len = chat::tokens(
        &m.tokenizer,
        Markers::of(&m.tokenizer).unwrap(),
        &msgs,
        true,
    )
    .len();
    let mut s = session(&m, prompt_len + 4, Overflow::Error);
    let (out, _) = collect(
        &mut s,
        &msgs,
        &GenerateParams {
            sampling: SamplingParams {
                temperature: 1.0,
                seed: Some(3),
                ..SamplingParams::greedy()
            },
            ..greedy(0)
        },
    );
    assert!(
        matches!(out.reason, DoneReason::ContextFull | DoneReason::Stop),
        "{:?}",
        out.reason
    );
    assert!(s.history().len() <= prompt_len + 4);

    let mut s = session(&m, 1024, Overflow::Error);
    let mut n = 0;
    let out = s
        .chat(&msgs, &greedy(100), &mut |id, _| {
            n += usize::from(id.is_some());
            n < 3
        })
        .unwrap();
    assert_eq!(out.reason, DoneReason::Cancelled);
    assert_eq!(n, 3);

    // The cancel flag, set from another thread before generation, is cleared by the next call.
    let flag = s.cancel_flag();
    flag.store(true, std::sync::atomic::Ordering::Relaxed);
    let (out, _) = collect(&mut s, &msgs, &greedy(3));
    assert_eq!(out.reason, DoneReason::Length);
}

#[test]
fn stop_strings_end_generation_unprinted() {
    let m = common::demo();
    let msgs = [Message::new(Role::User, "How do I open a file in Python?")];
    let (full, _) = collect(&mut session(&m, 1024, Overflow::Error), &msgs, &greedy(300));
    // Stop at the second word of the greedy reply: the reply must end right before it.
    let word = full.text.split_whitespace().nth(1).unwrap().to_string();
    let gp = GenerateParams {
        stop: vec![word.clone()],
        ..greedy(300)
    };
    let (out, text) = collect(&mut session(&m, 1024, Overflow::Error), &msgs, &gp);
    assert_eq!(out.reason, DoneReason::Stop);
    assert_eq!(text, full.text[..full.text.find(&word).unwrap()]);
}

#[test]
fn seeded_sampling_repeats() {
    let m = common::demo();
    let msgs = [Message::new(Role::User, "What is a dictionary?")];
    let gp = GenerateParams {
        sampling: SamplingParams {
            seed: Some(42),
            ..Default::default()
        },
        max_tokens: 40,
        ..Default::default()
    };
    let (a, _) = collect(&mut session(&m, 512, Overflow::Error), &msgs, &gp);
    let (b, _) = collect(&mut session(&m, 512, Overflow::Error), &msgs, &gp);
    assert_eq!(a.text, b.text);
}

/// A cancel sent while a chat is still tokenizing its messages is not lost: the chat ends as
/// cancelled without evaluating anything.
#[test]
fn cancel_during_tokenization_holds() {
    let m = common::demo();
    let mut s = session(&m, 2048, Overflow::Error);
    let flag = s.cancel_flag();
    let huge = Message::new(Role::User, "tell me about lists ".repeat(400_000));
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let t = std::time::Instant::now();
    let out = s.chat(&[huge], &greedy(8), &mut |_, _| true).unwrap();
    canceller.join().unwrap();
    assert_eq!(
        out.reason,
        DoneReason::Cancelled,
        "{:?} after {:?}",
        out.reason,
        t.elapsed()
    );
    assert_eq!(
        (out.timings.prompt_eval_count, out.timings.eval_count),
        (0, 0)
    );
    // The next call starts afresh.
    let (next, _) = collect(
        &mut s,
        &[Message::new(Role::User, "What is a tuple?")],
        &greedy(4),
    );
    assert_ne!(next.reason, DoneReason::Cancelled);
}

/// Drop-oldest tokenizes each message once: 4,000 messages fit in a small context quickly (it
/// re-tokenized the whole conversation per dropped message: 2 minutes).
#[test]
fn drop_oldest_is_linear_in_messages() {
    let m = common::demo();
    let mut s = session(&m, 256, Overflow::DropOldest);
    let mut msgs = vec![Message::new(
        Role::System,
        "You answer questions about Python.",
    )];
    for i in 0..4000 {
        let role = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        msgs.push(Message::new(
            role,
            format!("message number {i} about lists and dictionaries"),
        ));
    }
    msgs.push(Message::new(Role::User, "What is a list?"));
    let t = std::time::Instant::now();
    let (out, _) = collect(&mut s, &msgs, &greedy(4));
    assert!(
        out.dropped_messages > 3900,
        "dropped {}",
        out.dropped_messages
    );
    assert!(t.elapsed().as_secs_f32() < 20.0, "took {:?}", t.elapsed());
}

/// More threads than CPUs are clamped to the CPUs.
#[test]
fn threads_above_the_cpus_are_clamped() {
    let m = common::demo();
    let s = Session::new(
        m,
        &SessionParams {
            n_threads: phi4::limits::MAX_THREADS,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.n_threads(), phi4::limits::cpu_count());
}
